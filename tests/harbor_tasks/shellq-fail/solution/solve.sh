#!/bin/bash
# Wrong on purpose: the reward must be 0.
echo 5 > /app/sum.txt
echo "solved as $(id -un) in $PWD"
