"""The low-rank methods, one file each; every module here is imported by the METHODS
registry on first read, so a new method is one file with one `register` call."""
