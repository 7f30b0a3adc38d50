# FAVOR+ at the original's full size (16,906 genes, width 200, 6 layers, 10 heads of 64, 266 features, the original's
# classifier head), fp32, 2 threads: ours against lucidrains' performer-pytorch 1.1.4 in the same run.
pip install performer-pytorch==1.1.4           # only for the performer_pytorch variant
python bench.py --dataset= --variants=scbert,performer_pytorch --batch_sizes=1,4 --train=False --num_threads=2 \
    --out=results/favor/bench_full.json --plot=results/favor/bench_full.png > results/favor/bench_full.txt
# the same with one thread (another job used the other core)
python bench.py --dataset= --variants=scbert,performer_pytorch --batch_sizes=1,4 --train=False --num_threads=1 \
    --out=results/favor/bench_full_1thread.json --plot= > results/favor/bench_full_1thread.txt
# the allocator told to keep freed memory: no fresh pages after the first pass
GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296 \
    python bench.py --dataset= --variants=scbert,performer_pytorch --batch_sizes=1,4 --train=False --num_threads=2 \
    --out=results/favor/bench_full_malloc.json --plot= > results/favor/bench_full_malloc.txt
# the sweep over panel sizes, 1,000 to 16,906 genes, batch 1
python bench.py --scaling=True --variants=scbert,performer_pytorch --num_threads=2 \
    --out=results/favor/bench_scaling.json --scaling_plot=results/favor/bench_scaling.png \
    > results/favor/bench_scaling.txt
