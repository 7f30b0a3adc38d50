#!/bin/bash
# a second copy of sensitivity.sh after queue5.sh and queue6.sh: the two copies share the runs (each takes a lock)
cd "$(dirname "$0")/../.."
while pgrep -f "queue5.sh|queue6.sh" > /dev/null; do sleep 15; done
bash results/issue7/sensitivity.sh
