"""Helpers the library shares: reading and writing users' text files (`file_utils`)."""
