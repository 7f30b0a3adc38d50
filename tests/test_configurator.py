import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_script
from configurator import configure

SOURCE = '''"""Train a tiny model."""
batch_size = 32  # cells per optimizer step
learning_rate = 1e-4  # peak learning rate
compile = False  # torch.compile the model
out_dir = 'out'  # where checkpoints go
init_from = None  # checkpoint to start from (None = from scratch)
hidden = [8, 16]  # hidden sizes
'''


@pytest.fixture
def scope(tmp_path):
    """The globals a script would pass: its settings plus module attributes that are not settings."""
    path = tmp_path / 'train.py'
    path.write_text(SOURCE)
    scope = {'__file__': str(path), '__doc__': 'Train a tiny model.', '__name__': '__main__', 'sys': sys, 'Path': Path}
    exec(SOURCE, scope)
    return scope


def error_of(scope, argv, capsys):
    with pytest.raises(SystemExit) as e:
        configure(scope, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith('error: ') and err.count('\n') == 1, err
    return err.strip()


def test_no_arguments_returns_defaults(scope, capsys):
    config = configure(scope, [])
    assert config == {'batch_size': 32, 'learning_rate': 1e-4, 'compile': False, 'out_dir': 'out',
                      'init_from': None, 'hidden': [8, 16]}
    assert capsys.readouterr().out == ''  # nothing printed on success


def test_overrides_of_each_type(scope):
    config = configure(scope, ['--batch_size=64', '--learning_rate=3e-4', '--compile=True', '--out_dir=runs/a b',
                               '--hidden=[4, 4, 4]'])
    assert config['batch_size'] == 64 and type(config['batch_size']) is int
    assert config['learning_rate'] == 3e-4
    assert config['compile'] is True
    assert config['out_dir'] == 'runs/a b'
    assert config['hidden'] == [4, 4, 4]
    assert scope['batch_size'] == 64 and scope['out_dir'] == 'runs/a b'  # the caller's globals are updated


def test_float_accepts_int(scope):
    config = configure(scope, ['--learning_rate=1'])
    assert config['learning_rate'] == 1.0 and type(config['learning_rate']) is float


def test_str_is_taken_as_is(scope):
    assert configure(dict(scope), ['--out_dir=123'])['out_dir'] == '123'
    assert configure(dict(scope), ['--out_dir='])['out_dir'] == ''


@pytest.mark.parametrize('text, value', [('True', True), ('true', True), ('1', True),
                                         ('False', False), ('false', False), ('0', False)])
def test_bool_spellings(scope, text, value):
    assert configure(scope, [f'--compile={text}'])['compile'] is value


def test_bare_flag_means_true(scope):
    assert configure(scope, ['--compile'])['compile'] is True


def test_none_default_is_overridable(scope, tmp_path):
    # each call gets a fresh copy: configure() takes the scope's values at call time as the defaults
    assert configure(dict(scope), ['--init_from=5'])['init_from'] == 5
    assert configure(dict(scope), ['--init_from=out/ckpt.pt'])['init_from'] == 'out/ckpt.pt'
    assert configure(dict(scope), ['--init_from=[1, 2]'])['init_from'] == [1, 2]
    assert configure(dict(scope), ['--init_from=None'])['init_from'] is None
    # set in a config file, then back to None on the command line (checked against the default, None)
    config_file = tmp_path / 'c.py'
    config_file.write_text("init_from = 'resume'\n")
    assert configure(dict(scope), [str(config_file)])['init_from'] == 'resume'
    assert configure(dict(scope), [str(config_file), '--init_from=None'])['init_from'] is None


def test_config_file_then_command_line(scope, tmp_path):
    config_file = tmp_path / 'finetune.py'
    config_file.write_text("import math\nbatch_size = 8\nlearning_rate = 2  # int is fine for a float\n"
                           "out_dir = out_dir + '-finetune'  # config files see the current settings\n")
    config = configure(scope, [str(config_file), '--batch_size=16'])
    assert config['batch_size'] == 16  # command line wins over the config file
    assert config['learning_rate'] == 2.0 and type(config['learning_rate']) is float
    assert config['out_dir'] == 'out-finetune'


@pytest.mark.parametrize('arg, message', [
    ('--batch_size=abc', "error: --batch_size expects int, got 'abc'"),
    ('--batch_size=3.5', "error: --batch_size expects int, got '3.5'"),
    ('--learning_rate=fast', "error: --learning_rate expects float, got 'fast'"),
    ('--compile=yes', "error: --compile expects bool, got 'yes'"),
    ('--hidden=8', "error: --hidden expects list, got '8'"),
    ('--batch_size', "error: --batch_size needs a value: --batch_size=<int>"),
])
def test_type_errors(scope, capsys, arg, message):
    assert error_of(scope, [arg], capsys) == message


def test_type_error_in_config_file(scope, capsys, tmp_path):
    config_file = tmp_path / 'c.py'
    config_file.write_text("batch_size = '64'\n")
    assert error_of(scope, [str(config_file)], capsys) == f"error: batch_size in {config_file} expects int, got '64'"


def test_unknown_key_suggests_closest(scope, capsys):
    assert error_of(scope, ['--batchsize=3'], capsys) == \
        "error: unknown setting 'batchsize' (did you mean 'batch_size'?; see --help)"
    assert error_of(scope, ['--zzz=3'], capsys) == "error: unknown setting 'zzz' (see --help)"
    assert 'sys' not in configure(scope, [])  # modules, functions and _private names are not settings
    assert "unknown setting 'sys'" in error_of(scope, ['--sys=1'], capsys)


def test_unknown_key_in_config_file(scope, capsys, tmp_path):
    config_file = tmp_path / 'c.py'
    config_file.write_text('batch_size = 8\nlearning_rat = 0.1\n')
    assert error_of(scope, [str(config_file)], capsys) == \
        f"error: unknown setting 'learning_rat' in {config_file} (did you mean 'learning_rate'?; see --help)"


def test_missing_config_file(scope, capsys, tmp_path):
    missing = tmp_path / 'nope.py'
    assert error_of(scope, [str(missing)], capsys) == \
        f"error: config file '{missing}' not found (positional arguments are config files)"
    assert 'did you mean --batch_size=3?' in error_of(scope, ['batch_size=3'], capsys)


def test_broken_config_file_is_one_line(scope, capsys, tmp_path):
    config_file = tmp_path / 'c.py'
    config_file.write_text('batch_size = 8\nlearning_rate = 1 / 0\n')
    assert error_of(scope, [str(config_file)], capsys) == \
        f'error: in config file {config_file} line 2: ZeroDivisionError: division by zero'


def test_help_lists_every_setting(scope, capsys):
    with pytest.raises(SystemExit) as e:
        configure(scope, ['--batch_size=1', '--help'])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith('Train a tiny model.')
    lines = {line.split('=')[0].strip(): line for line in out.splitlines() if '=' in line and '#' in line}
    for name, default, description in [('batch_size', '32', 'cells per optimizer step'),
                                       ('learning_rate', '0.0001', 'peak learning rate'),
                                       ('compile', 'False', 'torch.compile the model'),
                                       ('out_dir', "'out'", 'where checkpoints go'),
                                       ('init_from', 'None', 'checkpoint to start from (None = from scratch)'),
                                       ('hidden', '[8, 16]', 'hidden sizes')]:
        left, comment = lines[name].split('#', 1)
        assert left.split('=', 1)[1].strip() == default
        assert comment.strip() == description
    assert configure(scope, [])['batch_size'] == 32  # --help changed nothing


def test_user_facing_error_is_one_line_without_traceback(tmp_path):
    script = tmp_path / 'tiny.py'
    script.write_text(f'import sys\nsys.path.insert(0, {str(ROOT)!r})\n'
                      'batch_size = 32  # cells per step\n'
                      'from configurator import configure\nconfig = configure(globals())\nprint(config)\n')
    bad = run_script(script, '--batchsize=64', check=False)
    assert bad.returncode == 2
    assert bad.stdout == ''
    assert bad.stderr == "error: unknown setting 'batchsize' (did you mean 'batch_size'?; see --help)\n"
    good = run_script(script, '--batch_size=64')
    assert good.returncode == 0 and good.stdout == "{'batch_size': 64}\n" and good.stderr == ''
