#!/bin/bash
# reward: the solution finished (it cannot have); solution_stopped: no `sleep 60` is left running (the agent's
# timeout interrupted it, so the verifier did not wait for it either).
finished=0; [ -e /app/finished ] && finished=1
stopped=1; pgrep -f "sleep 60" >/dev/null && stopped=0
printf '{"reward": %d, "solution_stopped": %d}\n' "$finished" "$stopped" > /logs/verifier/reward.json
