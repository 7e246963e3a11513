#!/bin/bash
# reward: the sum is right (the solution's is not); answered: the agent's user could write its answer in /app, as
# the verifier's user can write here in /logs/verifier.
answered=0; [ -f /app/sum.txt ] && answered=1
reward=0; [ "$(cat /app/sum.txt 2>/dev/null)" = 4 ] && reward=1
printf '{"reward": %d, "answered": %d}\n' "$reward" "$answered" > /logs/verifier/reward.json
echo "verified as $(id -un)"
