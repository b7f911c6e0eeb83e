"""`mpiexec -n 4 python -m mpi4py -m tfcourse.hello`: the first MPI program of the course.

The program lives in tfcourse/parallel/hello.py with the other MPI programs; this module
keeps the command line of chapter 0 and the README working."""

import sys

from tfcourse.parallel.hello import main

if __name__ == "__main__":
    sys.exit(main())
