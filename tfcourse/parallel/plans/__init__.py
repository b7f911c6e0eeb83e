"""How to split (chapters 6-8): MPI-free plans for batches and parameter owners, tensor
shards, pipeline schedules and their simulator, sequence chunks and task graphs. Notebooks and
exercises use them in the kernel; the MPI programs in tfcourse.parallel execute them."""
