#!/bin/bash
set -euo pipefail
tr '[:lower:]' '[:upper:]' < /app/word.txt > /app/answer.txt
echo "solved as $(id -un) in $PWD"
