"""`python -m batch ...` is `sdbatch ...` (and `torchrun --nproc-per-node N -m batch run MANIFEST`)."""
from batch.cli import main

main()
