"""
Settings for nanoscBERT's scripts, nanoGPT style: a script declares its settings as module globals,
each with a one-line comment, and hands its globals to configure():

    batch_size = 32          # cells per optimizer step
    init_from = None         # checkpoint to start from (None = from scratch)
    from configurator import configure
    config = configure(globals())   # updates the globals in place, returns {name: value} of all settings

Settings are the globals at call time whose names don't start with '_' and whose values are
bool/int/float/str/None/list/tuple. On the command line

    python train.py config/finetune_pbmc.py --batch_size=64 --compile --init_from=out/ckpt.pt

positional arguments are config files (Python files run in order, which may only assign known settings),
then each --key=value overrides one setting (a bare --key sets a bool setting to True), and -h/--help
prints the script's docstring and every setting with its default and the comment from its line.

Unlike nanoGPT's configurator.py (which is exec'd), this one is imported, and:
  - values are checked against the default's type: int; float (ints accepted); bool (True/False/true/false/1/0);
    str (taken as is); list/tuple (a Python literal). A setting whose default is None takes any value
    (a Python literal if it parses as one, else the raw string; 'None' gives None back).
  - an unknown name (on the command line or in a config file) is an error suggesting the closest names.
  - mistakes print one line "error: ..." to stderr and exit with status 2 (as argparse does), no traceback.
"""
import ast
import difflib
import io
import os
import sys
import textwrap
import tokenize
import traceback
import types

SETTING_TYPES = (bool, int, float, str, type(None), list, tuple)


class ConfigError(Exception):
    """A mistake in the command line or a config file; configure() reports it as one line and exits 2."""


def configure(scope, argv=None, sources=(), ignored_in_files=()):
    """sources: other files whose settings' comments --help shows (training.py's shared settings). ignored_in_files:
    names a config file may assign that this script does not have (they are dropped, with a note)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # snapshot the defaults: type checks are against the default, even after a config file changed the value
    defaults = {k: v for k, v in scope.items() if not k.startswith('_') and isinstance(v, SETTING_TYPES)}
    if '-h' in argv or '--help' in argv:
        print(help_text(scope, defaults, sources))
        raise SystemExit(0)
    try:
        for arg in argv:
            if arg.startswith('--'):
                name, eq, text = arg[2:].partition('=')
                if name not in defaults:
                    raise ConfigError(unknown(name, defaults))
                scope[name] = parse_arg(name, text if eq else None, defaults[name])
            elif arg.startswith('-'):
                raise ConfigError(f"unknown argument '{arg}' (settings are --key=value; see --help)")
            else:
                scope.update(run_config_file(arg, scope, defaults, ignored_in_files))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return {k: scope[k] for k in defaults}


def unknown(name, defaults, where=''):
    close = difflib.get_close_matches(name, defaults, n=3)
    hint = ' or '.join(f"'{c}'" for c in close)
    return f"unknown setting '{name}'{where} ({f'did you mean {hint}?; ' if close else ''}see --help)"


def parse_arg(name, text, default):
    """Parse the text of --name=text (text is None for a bare --name) into the default's type."""
    kind = type(default).__name__
    if text is None:
        if isinstance(default, bool):
            return True
        raise ConfigError(f"--{name} needs a value: --{name}=<{kind if default is not None else 'value'}>")
    if default is None:  # anything goes: a Python literal (3, 0.1, None, [1, 2]) or else the raw string
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    try:
        if isinstance(default, bool):
            return {'True': True, 'true': True, '1': True, 'False': False, 'false': False, '0': False}[text]
        if isinstance(default, (int, float, str)):
            return type(default)(text)  # int('3.5') fails; float('3') = 3.0; str is taken as is
        value = ast.literal_eval(text)  # list/tuple
        if isinstance(value, (list, tuple)):
            return type(default)(value)
    except (KeyError, ValueError, SyntaxError):
        pass
    raise ConfigError(f"--{name} expects {kind}, got '{text}'")


def check_value(name, value, default, path):
    """Check a value assigned in config file `path` against the default's type; ints become floats."""
    if default is None or (type(value) is type(default)):
        return value
    if isinstance(default, float) and type(value) is int:
        return float(value)
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    raise ConfigError(f"{name} in {path} expects {type(default).__name__}, got {value!r}")


def read_config(path, visible=None):
    """Run the config file at path -> {name: value} of the settings there after it ran: the names it assigned (and
    those of `visible`, the settings it may read, e.g. out_dir = out_dir + '-x'), leaving out _private names and
    imported modules. Nothing is type-checked (run_config_file does that). ConfigError, in one line, for a missing
    file or a bug in it. Config files only assign settings; this is the one place they are run."""
    if not os.path.isfile(path):
        hint = f"; did you mean --{path}?" if '=' in path else ''
        raise ConfigError(f"config file '{path}' not found (positional arguments are config files{hint})")
    namespace = dict(visible or {})
    namespace['__file__'] = path
    try:
        with open(path) as f:
            exec(compile(f.read(), path, 'exec'), namespace)
    except Exception as e:  # a bug in the config file: say where, in one line
        frames = [fr for fr in traceback.extract_tb(e.__traceback__) if fr.filename == path]
        line = getattr(e, 'lineno', None) if isinstance(e, SyntaxError) else (frames[-1].lineno if frames else None)
        raise ConfigError(f"in config file {path} line {line}: {type(e).__name__}: {e}") from None
    return {name: value for name, value in namespace.items()   # imports and helpers are fine
            if not name.startswith('_') and not isinstance(value, types.ModuleType)}


def run_config_file(path, scope, defaults, ignored=()):
    """Run a config file with the current settings visible; return the settings it assigned, type-checked. Names in
    `ignored` that are not settings here are dropped, with a note."""
    assigned, dropped = {}, []
    for name, value in read_config(path, {k: scope[k] for k in defaults}).items():
        if name in ignored and name not in defaults:
            dropped.append(name)
            continue
        if name not in defaults:
            raise ConfigError(unknown(name, defaults, where=f' in {path}'))
        assigned[name] = check_value(name, value, defaults[name], path)
    if dropped:
        print(f"note: {path} sets {', '.join(dropped)}, which this script takes from elsewhere: ignored")
    return assigned


def descriptions(path):
    """{name: comment} for module-level assignments in the source file that have a '# comment' on their line. The
    comment goes on over the comment-only lines right below it that start in the same column."""
    try:
        with open(path) as f:
            source = f.read()
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
        tree = ast.parse(source)
    except (OSError, SyntaxError, tokenize.TokenError):
        return {}
    comments = {tok.start[0]: (tok.start[1], tok.string.lstrip('#').strip())
                for tok in tokens if tok.type == tokenize.COMMENT}
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
    code_lines = {line for tok in tokens if tok.type not in skip for line in range(tok.start[0], tok.end[0] + 1)}
    found = {}
    for node in tree.body:
        if not isinstance(node, (ast.Assign, ast.AnnAssign)):
            continue
        line = node.end_lineno if node.end_lineno in comments else node.lineno
        if line not in comments:
            continue
        column, text = comments[line]
        while line + 1 in comments and line + 1 not in code_lines and comments[line + 1][0] == column:
            line += 1
            text += ' ' + comments[line][1]
        for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
            if isinstance(target, ast.Name) and text:
                found[target.id] = text
    return found


def help_text(scope, defaults, sources=(), width=120):
    """The script's docstring, usage and every setting: '  name = default  # description' when that fits in width
    characters, else the description on the lines below, wrapped and indented. The descriptions are the comments of
    the settings in the script and in `sources` (the modules whose settings it shares)."""
    described = {}
    for path in [*sources, scope.get('__file__')]:
        described.update(descriptions(path) if path else {})
    rows = [(f'{name} = {value!r}', described.get(name, '')) for name, value in defaults.items()]
    column = max((len(left) for left, _ in rows if len(left) <= 28), default=0)   # a long default pushes only its own
    script = os.path.basename(scope.get('__file__') or '<script>')
    lines = [(scope.get('__doc__') or '').strip(), '',
             f'usage: python {script} [config files...] [--key=value ...]', 'settings (default  # description):']
    for left, desc in rows:
        line = f'  {left:<{column}}  # {desc}' if desc else f'  {left}'
        if len(line) <= width:
            lines.append(line)
            continue
        lines.append(f'  {left}')
        lines += textwrap.wrap(desc, width, initial_indent='      # ', subsequent_indent='      # ',
                               break_long_words=False, break_on_hyphens=False)
    return '\n'.join(lines).lstrip('\n')
