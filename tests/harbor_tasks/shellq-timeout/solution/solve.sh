#!/bin/bash
sleep 60
touch /app/finished
