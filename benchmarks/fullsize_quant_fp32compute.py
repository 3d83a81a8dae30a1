"""`dgemma ARGS...` as on a CPU without native bf16: the CPU flags dgemma sees are masked to AVX-512F (no
avx512_bf16 / AMX), so 16-bit checkpoints compute in fp32 and quantized ones keep their dense parts (the token table
included) 16-bit in memory. For measuring that path's memory and speed on a machine that has native bf16:

    OMP_NUM_THREADS=1 /usr/bin/time -v python benchmarks/fullsize_quant_fp32compute.py generate --model DIR \\
        --prompt-ids 5,17,3,9,40,2,77,11 --max-denoising-steps 2 --max-new-tokens 256 --json --stats
"""

import sys

import dgemma.hardware as hardware

hardware.cpu_flags = lambda: frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl"})

from dgemma.cli import main  # noqa: E402  (after the mask: the loader reads the flags through hardware)

sys.exit(main(sys.argv[1:]))
