"""How to split (chapters 6-10): MPI-free plans for batches and parameter owners, tensor
shards, pipeline schedules and their simulator, sequence chunks, task graphs and expert
placement. Notebooks and
exercises use them in the kernel; the MPI programs in tfcourse.parallel execute them."""
