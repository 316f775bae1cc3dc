"""The error a site's job ends in; its text goes back to the server as the error reason."""


class ClientJobError(RuntimeError):
    """The job could not be run; the text is sent back to the server as the error reason."""
