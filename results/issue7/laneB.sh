#!/bin/bash
# after queue2.sh: move the fold-0 sensitivity runs into fold0/ and run folds 1-2
cd "$(dirname "$0")/../.."
sleep 60
while pgrep -f "queue2.sh|sensitivity.sh" > /dev/null; do sleep 20; done
for d in out-sens/*_f0 out-sens/*_f16; do
  [ -d "$d" ] && [ ! -d "$d/fold0" ] && { mkdir -p $d.tmp && mv $d/* $d.tmp/ && mkdir -p $d && mv $d.tmp $d/fold0; [ -f $d.log ] && mv $d.log $d/fold0.log; }
done
mv results/issue7/sensitivity.sh.new results/issue7/sensitivity.sh
bash results/issue7/sensitivity.sh
