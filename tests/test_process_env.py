"""How the command line and the benchmarks choose glibc's malloc, and when the CLI restarts."""

from __future__ import annotations

import io

import pytest

from ffcl_jax import process_env
from ffcl_jax.errors import UserError

RETAIN = ":".join(process_env.MALLOC_TUNABLES["retain"])


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """Sets what process_env reads of the machine, `(glibc, transparent huge pages)`, e.g.
    `("glibc 2.35", "always [madvise] never")`: None for another C library, or a kernel
    without transparent huge pages."""

    def set_machine(glibc, thp):
        def confstr(name):
            assert name == "CS_GNU_LIBC_VERSION"
            if glibc is None:
                raise ValueError("unrecognized configuration name")
            return glibc

        monkeypatch.setattr(process_env.os, "confstr", confstr)
        monkeypatch.setattr(process_env.sys, "platform", "linux")
        path = tmp_path / "transparent_hugepage_enabled"
        path.unlink(missing_ok=True)
        if thp is not None:
            path.write_text(thp + "\n")
        monkeypatch.setattr(process_env, "THP_ENABLED", path)

    return set_machine


@pytest.mark.parametrize(
    "glibc,thp,retain,hugepages",
    [
        ("glibc 2.35", "always [madvise] never", True, True),
        ("glibc 2.39", "[always] madvise never", True, True),
        ("glibc 2.34", "always [madvise] never", True, False),  # glibc ignores hugetlb
        ("glibc 2.28", "[always] madvise never", True, False),
        ("glibc 2.25", "[always] madvise never", False, False),  # no tunables at all
        ("glibc 2.36", "always madvise [never]", True, False),  # the kernel refuses huge pages
        ("glibc 2.36", None, True, False),  # a kernel without transparent huge pages
        (None, "[always] madvise never", False, False),  # another C library (musl)
        ("glibc 3.0", "always [madvise] never", True, True),
    ],
)
def test_each_choice_applies_only_where_glibc_reads_it(machine, glibc, thp, retain, hugepages):
    machine(glibc, thp)
    for choice, applies in (("retain", retain), ("hugepages", hugepages)):
        wanted = process_env.MALLOC_TUNABLES[choice]
        env = process_env.with_malloc({"PATH": "/bin"}, choice)
        assert env == ({"PATH": "/bin", "GLIBC_TUNABLES": ":".join(wanted)} if applies else None)
        # A record (results.json, the benchmarks') claims the tunables only where they applied.
        assert process_env.malloc_in_effect(":".join(wanted)) == (choice if applies else "system")
    recorded = process_env.tunables_in_effect("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
    pairs = (("glibc.malloc.arena_max=2", retain), ("glibc.malloc.hugetlb=1", hugepages))
    kept = [tunable for tunable, applies in pairs if applies]
    assert recorded == ":".join(kept)
    assert process_env.with_malloc({}, "system") is None


def test_the_machine_is_read_as_glibc_and_the_kernel_report_it(machine):
    machine("glibc 2.36", "always [madvise] never")
    assert process_env.glibc_version() == (2, 36)
    assert process_env.transparent_hugepages() == "madvise"
    machine("glibc 2.17-pre1", None)
    assert process_env.glibc_version() == (2, 17) and process_env.transparent_hugepages() is None
    machine(None, "[never]")
    assert process_env.glibc_version() is None


def test_the_default_is_retain_and_the_users_own_tunables_are_left_alone(machine):
    machine("glibc 2.36", "always [madvise] never")
    env = process_env.with_malloc({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": RETAIN}
    assert process_env.with_malloc(env) is None  # the restarted process goes on
    # The benchmarks' workers: the choice from the environment.
    chosen = process_env.with_malloc({process_env.CHOICE_VARIABLE: "hugepages"})
    assert chosen["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert process_env.with_malloc({process_env.CHOICE_VARIABLE: "system"}) is None
    # A malloc tunable of the user's own: nothing added; another tunable: kept, ours added.
    assert process_env.with_malloc({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) is None
    theirs = process_env.with_malloc({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"})
    assert theirs["GLIBC_TUNABLES"] == "glibc.pthread.rseq=0:" + RETAIN
    with pytest.raises(ValueError, match="unknown malloc choice 'tcmalloc'.*retain"):
        process_env.with_malloc({}, "tcmalloc")


def test_a_record_names_its_choice_as_it_was_made():
    assert process_env.malloc_choice(RETAIN) == "retain"
    assert process_env.malloc_choice("glibc.pthread.rseq=0:" + RETAIN) == "retain"
    assert process_env.malloc_choice("glibc.malloc.hugetlb=1") == "hugepages"
    assert process_env.malloc_choice("glibc.malloc.arena_max=1") == "system"  # part of one
    assert process_env.malloc_choice("") == "system"


def test_an_unknown_choice_is_refused_by_the_config_check():
    from ffcl_jax.config_base import base_config, check_config

    config = base_config()
    config.cpu.malloc = "tcmalloc"
    with pytest.raises(UserError, match="unknown config.cpu.malloc 'tcmalloc'; valid: retain"):
        check_config(config, 1)


def test_a_checkpoint_from_before_the_choice_resumes_and_the_old_override_says_where_it_went():
    from ffcl_jax import checkpoint, errors
    from ffcl_jax.config_base import base_config

    config = base_config()
    saved = checkpoint.flat_config(config)
    del saved["cpu.malloc"]
    saved["cpu.hugepage_malloc"] = True
    assert checkpoint.config_differences(saved, config) == []
    hint = errors._moved_key(["main", "--config.cpu.hugepage_malloc=false"])
    assert hint == "--config.cpu.hugepage_malloc is now --config.cpu.malloc"


class _Exec(Exception):
    """Raised in place of os.execve: the process would have been replaced here."""


def _main_with_an_exec_pending(monkeypatch, malloc="retain"):
    """ffcl_jax.main where a restart is due (the tunables apply and are not set), with
    os.execve raising _Exec and absl's app.run standing for parsing a config that sets
    `cpu.malloc` and starting training."""
    from ffcl_jax import main
    from ffcl_jax.config_base import base_config

    monkeypatch.setattr(
        process_env,
        "with_malloc",
        lambda env, choice: None if choice == "system" else {**env, "GLIBC_TUNABLES": choice},
    )
    monkeypatch.setattr(main, "_MAY_RESTART", False)
    config = base_config()
    config.cpu.malloc = malloc
    started = []

    def app_run(fn, **kwargs):
        main.restart_if_asked(config)  # what main.main does first with the parsed config
        started.append(fn)

    monkeypatch.setattr(main.app, "run", app_run)

    def execve(path, argv, env):
        raise _Exec(path, argv, env)

    monkeypatch.setattr(main.os, "execve", execve)
    return main, started


def test_main_run_from_python_never_replaces_the_process(monkeypatch):
    """A script, a notebook or a test that calls `main.run()` must go on as itself."""
    main, started = _main_with_an_exec_pending(monkeypatch)
    main.run()  # _Exec, were it to restart
    assert started == [main.main]


# An unknown choice (tcmalloc) is the config check's to refuse, with what is valid.
@pytest.mark.parametrize("malloc", ["system", "tcmalloc"])
def test_main_cli_keeps_its_process_when_the_config_says_so(monkeypatch, malloc):
    main, started = _main_with_an_exec_pending(monkeypatch, malloc=malloc)
    main.cli()
    assert started == [main.main]


def test_main_cli_flushes_stdio_then_restarts_with_the_configs_choice(monkeypatch):
    main, started = _main_with_an_exec_pending(monkeypatch, malloc="hugepages")
    written = {}
    for name in ("stdout", "stderr"):
        written[name] = io.BytesIO()
        stream = io.TextIOWrapper(written[name], write_through=False)
        stream.write(f"{name} line not yet flushed\n")
        monkeypatch.setattr(main.sys, name, stream)
    with pytest.raises(_Exec) as raised:
        main.cli()
    path, argv, env = raised.value.args
    assert path == main.sys.executable and argv == [path, *main.sys.orig_argv[1:]]
    assert env["GLIBC_TUNABLES"] == "hugepages" and started == []
    for name, buffer in written.items():
        assert buffer.getvalue() == f"{name} line not yet flushed\n".encode()
    # Once restarted (or where the tunables do not apply), the CLI trains in this process.
    monkeypatch.setattr(process_env, "with_malloc", lambda env, choice: None)
    main.cli()
    assert started == [main.main]
