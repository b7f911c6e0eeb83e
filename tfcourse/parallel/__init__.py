"""Parallel chapters: programs run as `mpiexec -n N python -m tfcourse.parallel.<mode>`."""
