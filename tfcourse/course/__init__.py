"""Course tooling, apart from the course's subject: starting MPI jobs from a notebook
(launch), executing notebooks and generating exercises (nbtools), exercise checks (check),
widgets and plots (widgets, viz)."""
