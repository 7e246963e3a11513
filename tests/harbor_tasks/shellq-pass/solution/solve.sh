#!/bin/bash
set -euo pipefail
tr '[:lower:]' '[:upper:]' < /app/word.txt > /app/answer.txt
echo "solved as $(id -un) in $PWD"
# A server the verifier checks on, as tasks that start a service do: it must outlive this exec.
sleep 600 &
echo $! > /app/server.pid
