"""Helpers the library shares: reading and writing users' text files (`file_utils`), and keeping freed memory for
reuse on the CPU (`memory`)."""
