"""
nanoGPT's configurator, for train.py: defaults are plain values; config files (python files of plain
assignments) and then --key=value arguments override them, type-checked against the defaults.

    config, given = parse_config(sys.argv[1:], {"max_iters": 200, "learning_rate": 1e-3, ...}, fail)
"""

import ast
import builtins
import re


def parse_config(argv, defaults, fail):
    """argv (config files and --key=value) applied to a copy of `defaults` (key -> default value) ->
    (config dict, set of the keys the arguments assigned).

    Values are Python literals (a bare word is a string), converted int -> float and list -> tuple where
    the default asks for it, and must then have the default's type. fail(message) is called on an
    unknown key, a wrong type, a missing or broken config file.
    """
    config, given = dict(defaults), set()

    def assign(key, value, where):
        if key not in defaults:
            fail(f"{where}: unknown config key {key!r}; --help lists them")
        expected = type(defaults[key])
        if expected is float and type(value) is int:
            value = float(value)
        if expected is tuple and isinstance(value, list):
            value = tuple(value)
        if type(value) is not expected:
            fail(f"{where}: {key} must be a {expected.__name__}, got {value!r}")
        config[key] = value
        given.add(key)

    for arg in argv:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if not sep:
                fail(f"{arg}: overrides are written --key=value (--help lists the keys)")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text                                    # a bare string
            assign(key, value, arg)
            continue
        try:
            source, values = open(arg).read(), {}
        except OSError:
            fail(f"config file {arg} not found")
        try:
            exec(builtins.compile(source, arg, "exec"), {}, values)
        except Exception as e:  # a config file is Python: any error in it is the user's to fix
            fail(f"config file {arg}: {type(e).__name__}: {e}")
        for key, value in values.items():
            assign(key, value, arg)
    return config, given


def key_comments(*sources):
    """{name: comment} of the `name = value  # comment` (or `name: type = value  # comment`) lines of sources."""
    comments = {}
    for source in sources:
        comments.update(re.findall(r"^\s*(\w+)\s*(?::\s*\w+)?\s*=\s*[^#\n]*#\s*(.*)$", source, re.M))
    return comments
