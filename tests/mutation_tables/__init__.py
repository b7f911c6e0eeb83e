"""Classic wrong answers to the exercises, one module per solution notebook (issue 18).

Each module defines MUTATIONS = {function name: {wrong answer's name: replacement code}}: the
code replaces the lines between the function's `### BEGIN SOLUTION` and `### END SOLUTION`
(write it unindented; it is indented like the solution). tests/test_mutations.py runs the
notebook with each one in place and requires a check cell to reject it."""
