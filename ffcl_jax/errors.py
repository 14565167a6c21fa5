"""The one exception type for bad user input (config, model name, data set, files).

`main` prints these as a single `error: ...` line that says what to do, instead of a traceback.
It subclasses ValueError so that callers catching ValueError keep working.
"""


class UserError(ValueError):
    pass
