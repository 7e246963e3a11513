#!/bin/bash
# Compares /app/answer.txt with tests/data/expected.txt (a subdirectory of the uploaded tests); leaves a report in a
# subdirectory of /logs/verifier, which Harbor downloads.
mkdir -p /logs/verifier/report
if cmp -s /app/answer.txt /tests/data/expected.txt; then
    echo 1 > /logs/verifier/reward.txt
else
    echo 0 > /logs/verifier/reward.txt
fi
echo "verified as $(id -un) in $PWD" > /logs/verifier/report/who.txt
if kill -0 "$(cat /app/server.pid)" 2>/dev/null; then echo running; else echo gone; fi > /logs/verifier/report/server.txt
