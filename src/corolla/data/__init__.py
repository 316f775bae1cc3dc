"""Where silos come from: files, folders, datasets and databases, read as rows with named columns.

Both sides use it: sites read their silo, the server its test data, `corolla sim`
its simulated silos. It imports no model library.
"""
