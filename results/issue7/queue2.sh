#!/bin/bash
# the ablations that read the gene annotation (prepare_data.py --annotate=data/baron1k ...), after sensitivity.sh
cd "$(dirname "$0")/../.."
while pgrep -f sensitivity.sh > /dev/null; do sleep 20; done
run() { name=$1; shift; [ -f out-abl/$name/metrics.json ] && return; /usr/bin/time -f "%e s" python train.py config/ablation_baron.py --out_dir=out-abl/$name --num_threads=1 "$@" > results/issue7/abl_$name.log 2>&1; }
run genomic_pe --genomic_pe=True
run pathway_enc --pathway_enc=True
run disentangled --disentangled=True
