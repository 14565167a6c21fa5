"""The one exception type for bad user input (config, model name, data set, files).

`main` and `compile_for` print these as a single `error: ...` line that says what to do, instead
of a traceback. It subclasses ValueError so that callers catching ValueError keep working.
"""


class UserError(ValueError):
    pass


def parse_flags_or_exit(argv: list[str]) -> list[str]:
    """absl's parser for the command-line modules, but a bad flag, config file argument or
    `--config.*` override (unknown key, wrong type) ends in one `error:` line and exit status 2
    instead of a traceback."""
    import sys

    from absl import flags

    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as exc:
        text = str(exc).strip()
        if "Traceback (most recent call last)" in text:  # a config file's own error, wrapped
            text = text.splitlines()[-1]
        if len(text) >= 2 and text[0] == text[-1] == "'":  # ConfigDict's repr-quoted messages
            text = text[1:-1]
        reason = " ".join(text.replace("\\'", "'").replace("\\n", " ").split())
        if isinstance(exc, (AttributeError, KeyError)):
            reason = _moved_key(argv) or f"unknown config key {reason}"
        print(
            f"error: bad command line or config ({reason}); see the config file for valid keys",
            file=sys.stderr,
        )
        sys.exit(2)


def _moved_key(argv: list[str]) -> str | None:
    """For an override of a config key that moved (`checkpoint.RENAMED_KEYS`), where it went."""
    from ffcl_jax.checkpoint import RENAMED_KEYS

    for arg in argv[1:]:
        name = arg.split("=", 1)[0].removeprefix("--config.")
        if name in RENAMED_KEYS:
            return f"--config.{name} is now --config.{RENAMED_KEYS[name]}"
    return None
