"""Which project files go into a step image (stepflow.remote._context)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from stepflow.errors import ImageBuildError
from stepflow.remote._context import ContextListing, ProjectRootError, format_listing, list_context

# Secret-looking test data is assembled at runtime so this file does not itself look like a secret.
PEM_HEADER = "-----BEGIN " + "RSA PRIVATE KEY-----"
AWS_KEY_ID = "AKIA" + "Q7LMZ3RT5XN2KD4W"
AWS_SECRET = "wJ8rXUtnFEMI" + "K7MDENGbPxRf" + "iCYzq1Hk9a2L" + "m3Np"
GITHUB_TOKEN = "ghp" + "_" + "a1B2c3D4e5F6g7H8i9J0" * 2


def write(root: Path, rel: str, text: str = "x\n") -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    write(root, "app.py", "print('hi')\n")
    return root


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A stepflow home outside the project."""
    return tmp_path / "stepflow-home"


def shipped(listing: ContextListing) -> list[str]:
    return [f.rel for f in listing.files]


def reasons(listing: ContextListing) -> dict[str, str]:
    return {e.rel: e.reason for e in listing.excluded}


def warned(listing: ContextListing) -> dict[str, str]:
    return {w.rel: w.reason for w in listing.warnings}


# ------------------------------------------------------------------------------------ mandatory
def test_env_files_are_excluded_even_when_stepflowignore_reincludes_them(project: Path, home: Path) -> None:
    write(project, ".env", "DB_PASSWORD=hunter2\n")
    write(project, ".env.local", "TOKEN=abc\n")
    write(project, "services/api/.env.production", "KEY=1\n")
    write(project, ".stepflowignore", "!.env\n!.env.*\n!/services/api/.env.production\n")
    listing = list_context(project, home=home)
    assert shipped(listing) == [".stepflowignore", "app.py"]
    why = reasons(listing)
    for rel in (".env", ".env.local", "services/api/.env.production"):
        assert why[rel] == "mandatory: environment file"


def test_vcs_caches_build_outputs_are_excluded_once_per_folder(project: Path, home: Path) -> None:
    for rel in (".git/config", ".git/objects/ab/cdef", "pkg/__pycache__/m.cpython-311.pyc", "node_modules/x/i.js",
                "dist/pkg.whl", "build/lib/m.py", "pkg.egg-info/PKG-INFO", ".pytest_cache/v/x", "pkg/m.pyc"):
        write(project, rel)
    write(project, "build.sh", "#!/bin/sh\n")  # a file that only starts like a build folder
    write(project, "scripts/build", "#!/bin/sh\n")  # a *file* named build is code
    listing = list_context(project, home=home)
    assert shipped(listing) == ["app.py", "build.sh", "scripts/build"]
    assert [(e.rel, e.is_dir) for e in listing.excluded] == [
        (".git", True), (".pytest_cache", True), ("build", True), ("dist", True), ("node_modules", True),
        ("pkg.egg-info", True), ("pkg/__pycache__", True), ("pkg/m.pyc", False)]
    assert reasons(listing)[".git"] == "mandatory: version control"
    assert reasons(listing)["pkg/__pycache__"] == "mandatory: cache"


def test_credentials_are_excluded(project: Path, home: Path) -> None:
    for rel in (".aws/credentials", ".aws/config", ".ssh/id_rsa", ".ssh/known_hosts", "deploy/id_ed25519",
                "certs/server.pem", "certs/server.key", ".config/gcloud/application_default_credentials.json",
                "gcp/service-account-prod.json", "credentials.json", ".netrc", ".pypirc", ".docker/config.json",
                ".kube/config", "web/.htpasswd", "android/release.keystore"):
        write(project, rel)
    write(project, ".config/app.toml")  # .config itself is fine, only .config/gcloud is not
    write(project, ".stepflowignore", "!.aws/\n!.ssh/\n!*.pem\n")
    listing = list_context(project, home=home)
    assert shipped(listing) == [".config/app.toml", ".stepflowignore", "app.py"]
    why = reasons(listing)
    for rel in (".aws", ".ssh", "deploy/id_ed25519", "certs/server.pem", "certs/server.key", ".config/gcloud",
                "gcp/service-account-prod.json", "credentials.json", ".netrc", ".pypirc", ".docker", ".kube",
                "web/.htpasswd", "android/release.keystore"):
        assert why[rel] == "mandatory: credentials", rel


def test_stepflow_home_inside_the_project_is_excluded(project: Path) -> None:
    home = project / "state"  # an unusual name: only the path passed in tells it apart
    for name in ("stepflow.db", "stepflow.db-wal", "stepflow.db-shm", "stepflow.key", "artifacts/run1/out.pkl"):
        write(home, name)
    # The caller may pass the home through a symlink; it is resolved.
    link = project.parent / "home-link"
    link.symlink_to(home)
    listing = list_context(project, home=link)
    assert shipped(listing) == ["app.py"]
    assert [(e.rel, e.reason, e.is_dir) for e in listing.excluded] == [("state", "mandatory: stepflow home", True)]


def test_stray_store_files_are_excluded_anywhere(project: Path, home: Path) -> None:
    for name in ("old/stepflow.db", "old/stepflow.db-wal", "old/stepflow.db-shm", "old/stepflow.key"):
        write(project, name)
    listing = list_context(project, home=home)
    assert shipped(listing) == ["app.py"]
    assert reasons(listing)["old/stepflow.db"] == "mandatory: stepflow store"
    assert reasons(listing)["old/stepflow.key"] == "mandatory: credentials"


def test_virtualenv_is_detected_by_pyvenv_cfg_under_any_name(project: Path, home: Path) -> None:
    write(project, "tools/py311-sandbox/pyvenv.cfg", "home = /usr/bin\n")
    write(project, "tools/py311-sandbox/lib/python3.11/site-packages/requests/__init__.py")
    write(project, "tools/helper.py")
    write(project, "envs/conda1/conda-meta/history")
    write(project, "venv/lib/x.py")
    listing = list_context(project, home=home)
    assert shipped(listing) == ["app.py", "tools/helper.py"]
    assert [(e.rel, e.reason) for e in listing.excluded] == [
        ("envs/conda1", "mandatory: virtualenv (conda-meta)"),
        ("tools/py311-sandbox", "mandatory: virtualenv (pyvenv.cfg)"),
        ("venv", "mandatory: virtualenv"),
    ]


# ------------------------------------------------------------------------------------ ignore files
def test_gitignored_files_and_folders_are_excluded(project: Path, home: Path) -> None:
    write(project, ".gitignore", "# logs\n*.log\n\ndata/\n")
    write(project, "run.log")
    write(project, "logs/deep/train.log")
    write(project, "data/raw/a.csv")
    write(project, "data/raw/b.csv")
    write(project, "src/data.py")
    listing = list_context(project, home=home)
    assert shipped(listing) == [".gitignore", "app.py", "src/data.py"]
    assert reasons(listing) == {
        "data": ".gitignore (.gitignore: line 4 'data/')",  # once, not each file inside
        "logs/deep/train.log": ".gitignore (.gitignore: line 2 '*.log')",
        "run.log": ".gitignore (.gitignore: line 2 '*.log')",
    }


def test_nested_gitignore_applies_to_its_folder(project: Path, home: Path) -> None:
    write(project, ".gitignore", "*.csv\n")
    write(project, "sub/.gitignore", "local.txt\n/anchored.txt\n!keep.csv\n")
    for rel in ("local.txt", "anchored.txt", "sub/local.txt", "sub/anchored.txt", "sub/deeper/anchored.txt",
                "sub/deeper/local.txt", "sub/keep.csv", "sub/drop.csv", "keep.csv"):
        write(project, rel)
    listing = list_context(project, home=home)
    assert shipped(listing) == [".gitignore", "anchored.txt", "app.py", "local.txt", "sub/.gitignore",
                                "sub/deeper/anchored.txt", "sub/keep.csv"]
    assert reasons(listing) == {
        "keep.csv": ".gitignore (.gitignore: line 1 '*.csv')",
        "sub/anchored.txt": ".gitignore (sub/.gitignore: line 2 '/anchored.txt')",
        "sub/deeper/local.txt": ".gitignore (sub/.gitignore: line 1 'local.txt')",
        "sub/drop.csv": ".gitignore (.gitignore: line 1 '*.csv')",
        "sub/local.txt": ".gitignore (sub/.gitignore: line 1 'local.txt')",
    }


def test_git_info_exclude_is_honoured(project: Path, home: Path) -> None:
    write(project, ".git/info/exclude", "# git ls-files --others --exclude-from=.git/info/exclude\nscratch/\n")
    write(project, "scratch/notes.txt")
    listing = list_context(project, home=home)
    assert shipped(listing) == ["app.py"]
    assert reasons(listing)["scratch"] == ".git/info/exclude (line 2 'scratch/')"


def test_gitignore_of_an_enclosing_repository_applies(tmp_path: Path, home: Path) -> None:
    repo = tmp_path / "monorepo"
    write(repo, ".git/HEAD", "ref: refs/heads/main\n")
    write(repo, ".git/info/exclude", "*.tmp\n")
    write(repo, ".gitignore", "*.ckpt\n/ml/outputs/\n")
    write(repo, "ml/train.py")
    write(repo, "ml/model.ckpt")
    write(repo, "ml/outputs/run1.json")
    write(repo, "ml/cache.tmp")
    listing = list_context(repo / "ml", home=home)
    assert shipped(listing) == ["train.py"]
    assert reasons(listing) == {
        "cache.tmp": "../.git/info/exclude (line 1 '*.tmp')",
        "model.ckpt": ".gitignore (../.gitignore: line 1 '*.ckpt')",
        "outputs": ".gitignore (../.gitignore: line 2 '/ml/outputs/')",
    }


def test_stepflowignore_reincludes_what_git_ignores(project: Path, home: Path) -> None:
    write(project, ".gitignore", "*.bin\nmodels/\nnotes.md\n")
    write(project, ".stepflowignore", "!weights.bin\n!models/best.pt\nscratch.py\n")
    for rel in ("weights.bin", "other.bin", "models/best.pt", "models/last.pt", "models/old/a.pt", "notes.md",
                "scratch.py"):
        write(project, rel)
    listing = list_context(project, home=home)
    assert shipped(listing) == [".gitignore", ".stepflowignore", "app.py", "models/best.pt", "weights.bin"]
    assert reasons(listing) == {
        "models/last.pt": ".gitignore (.gitignore: line 2 'models/')",
        "models/old": ".gitignore (.gitignore: line 2 'models/')",
        "notes.md": ".gitignore (.gitignore: line 3 'notes.md')",
        "other.bin": ".gitignore (.gitignore: line 1 '*.bin')",
        "scratch.py": ".stepflowignore (line 3 'scratch.py')",
    }


def test_extra_excludes_and_invalid_patterns(project: Path, home: Path) -> None:
    write(project, "big/blob.dat")
    listing = list_context(project, home=home, extra_excludes=["big/"])
    assert shipped(listing) == ["app.py"]
    assert reasons(listing) == {"big": "extra excludes ('big/')"}
    write(project, ".stepflowignore", "ok.txt\n!\n")
    with pytest.raises(ImageBuildError, match=r"\.stepflowignore \(line 2 '!'\)"):
        list_context(project, home=home)


# ------------------------------------------------------------------------------------ symlinks
def test_symlinks(tmp_path: Path, project: Path, home: Path) -> None:
    outside = write(tmp_path, "elsewhere/id.txt", "outside\n")
    write(project, "config/settings.toml", "a = 1\n")
    write(project, ".env", "A=1\n")
    (project / "escape.txt").symlink_to(outside)
    (project / "settings.toml").symlink_to(project / "config" / "settings.toml")
    (project / "relative.toml").symlink_to("config/settings.toml")
    (project / "vars.txt").symlink_to(".env")
    (project / "linked-dir").symlink_to(project / "config")
    (project / "dangling").symlink_to(project / "missing")
    listing = list_context(project, home=home)
    assert shipped(listing) == ["app.py", "config/settings.toml", "relative.toml", "settings.toml"]
    by_rel = {f.rel: f for f in listing.files}
    assert by_rel["settings.toml"].path == (project / "config" / "settings.toml").resolve()
    why = reasons(listing)
    assert why["escape.txt"].startswith("symlink to a file outside the project")
    assert why["vars.txt"] == "symlink to an excluded file (.env: mandatory: environment file)"
    assert why["linked-dir"] == "symlink to a folder (symlinked folders are not followed)"
    assert why["dangling"] == "broken symlink"


# ------------------------------------------------------------------------------------ secrets
def test_secret_warnings(project: Path, home: Path) -> None:
    write(project, "notes/deploy-key.txt", f"{PEM_HEADER}\nMIIEowIBAAKCAQEA\n")
    write(project, "scripts/upload.sh", f"export AWS_ACCESS_KEY_ID={AWS_KEY_ID}\nexport AWS_SECRET_ACCESS_KEY={AWS_SECRET}\n")
    write(project, "scripts/lonely_id.sh", f"# key id only, no secret: {AWS_KEY_ID}\n")
    write(project, "docs/example.md", "AKIA" + "IOSFODNN7EXAMPLE and " + AWS_SECRET + "\n")
    write(project, "ci/gh.yaml", f"token_value: {GITHUB_TOKEN}\n")
    write(project, "conf/db.yaml", "db:\n  host: localhost\n  password: \"s3cr3t-value\"\n")
    write(project, "conf/templated.yaml", "db:\n  password: ${DB_PASSWORD}\n")
    write(project, "hf_token", "abc\n")
    write(project, "infra/prod.tfstate", "{}\n")
    write(project, "model/tokenizer.json", '{"pad_token": "[PAD]", "eos_token": "</s>"}\n')
    write(project, "model/special_tokens_map.json", '{"unk_token": "<unk>"}\n')
    (project / "model/weights.bin").write_bytes(b"\0" + PEM_HEADER.encode())
    listing = list_context(project, home=home)
    assert "notes/deploy-key.txt" in shipped(listing)  # a warning, not an exclusion
    assert warned(listing) == {
        "ci/gh.yaml": "content: GitHub token",
        "conf/db.yaml": "content: assignment to 'password'",
        "hf_token": "name contains 'token'",
        "infra/prod.tfstate": "name: Terraform state",
        "notes/deploy-key.txt": "content: PEM private key",
        "scripts/upload.sh": "content: AWS access key id with a secret access key nearby; content: aws_secret_access_key",
    }
    warning = next(w for w in listing.warnings if w.rel == "notes/deploy-key.txt")
    assert warning.message == ("notes/deploy-key.txt looks like a secret (content: PEM private key); if it is, "
                               "add '/notes/deploy-key.txt' to .stepflowignore")
    # Following the advice removes the file and the warning.
    write(project, ".stepflowignore", warning.ignore_line + "\n")
    listing = list_context(project, home=home)
    assert "notes/deploy-key.txt" not in warned(listing)
    assert reasons(listing)["notes/deploy-key.txt"] == ".stepflowignore (line 1 '/notes/deploy-key.txt')"
    assert list_context(project, home=home, scan_secrets=False).warnings == ()


# ------------------------------------------------------------------------------------ root checks
def test_home_directory_and_filesystem_root_are_refused(home: Path) -> None:
    with pytest.raises(ProjectRootError, match=r"home directory|filesystem root"):
        list_context(Path.home(), home=home)
    with pytest.raises(ProjectRootError, match="filesystem root"):
        list_context(Path(os.sep), home=home)
    with pytest.raises(ProjectRootError, match="not a directory"):
        list_context(home / "missing", home=home)


def test_a_home_directory_with_keys_is_refused(tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    user_home = tmp_path / "alice"
    write(user_home, ".aws/credentials")
    write(user_home, ".ssh/id_rsa")
    # A dotfiles repository in the home folder ignores everything; it must not swallow projects below it.
    write(user_home, ".git/HEAD", "ref: refs/heads/main\n")
    write(user_home, ".gitignore", "*\n")
    write(user_home, "code/proj/train.py")
    monkeypatch.setenv("HOME", str(user_home))
    with pytest.raises(ProjectRootError, match="set project_root"):
        list_context(user_home, home=home)
    with pytest.raises(ProjectRootError, match="contains your home directory"):
        list_context(tmp_path, home=home)
    assert shipped(list_context(user_home / "code" / "proj", home=home)) == ["train.py"]


def test_project_inside_the_stepflow_home_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "sf-home"
    write(home, "projects/p/app.py")
    with pytest.raises(ProjectRootError, match="inside the stepflow home"):
        list_context(home / "projects" / "p", home=home)


# ------------------------------------------------------------------------------------ report
def test_format_listing(project: Path, home: Path) -> None:
    write(project, "data/big.bin", "0" * 3000)
    write(project, ".gitignore", "tmp/\n")
    write(project, "tmp/x")
    write(project, ".env")
    write(project, "secret.txt", "x\n")
    (project / "run.sh").write_text("#!/bin/sh\n")
    (project / "run.sh").chmod(0o755)
    listing = list_context(project, home=home)
    text = format_listing(listing)
    assert "Ships (5 files, 3.0 KiB):" in text
    assert "2.9 KiB  data/big.bin" in text
    assert "run.sh  (executable)" in text
    assert "Total: 5 files, 3.0 KiB" in text
    assert ".env  " in text and "mandatory: environment file" in text
    assert "tmp/" in text and ".gitignore (.gitignore: line 1 'tmp/')" in text
    assert "secret.txt looks like a secret (name contains 'secret')" in text
    assert "Excluded" not in format_listing(listing, show_excluded=False)


# ------------------------------------------------------------------------------------ performance
def test_listing_20k_files(tmp_path: Path, home: Path) -> None:
    root = tmp_path / "big"
    (root / ".gitignore").parent.mkdir(parents=True)
    (root / ".gitignore").write_text("\n".join([
        "__pycache__/", "*.py[cod]", "*.so", ".Python", "build/", "develop-eggs/", "dist/", "downloads/",
        "eggs/", ".eggs/", "lib64/", "parts/", "sdist/", "var/", "wheels/", "*.egg-info/", ".installed.cfg",
        "*.egg", "*.manifest", "*.spec", "pip-log.txt", "htmlcov/", ".coverage", ".coverage.*", "nosetests.xml",
        "coverage.xml", "*.cover", ".hypothesis/", "*.mo", "*.pot", "*.log", "instance/", ".scrapy", "docs/_build/",
        "target/", ".ipynb_checkpoints", "profile_default/", "celerybeat-schedule", "*.sage.py", ".spyderproject",
        "site/", "outputs/", "wandb/", "mlruns/", "*.ckpt",
    ]) + "\n")
    count = 0
    for package in range(100):
        folder = root / f"pkg{package}" / "sub"
        folder.mkdir(parents=True)
        for i in range(200):
            suffix = ".log" if i % 50 == 0 else ".py"
            (folder / f"mod_{i}{suffix}").write_text(f"VALUE = {i}\n")
            count += 1
    for i in range(2000):  # a folder never entered
        (root / "outputs").mkdir(exist_ok=True)
        (root / "outputs" / f"r{i}.json").write_text("{}")
    assert count == 20_000
    timings = {}
    for scan in (True, False):
        start = time.perf_counter()
        listing = list_context(root, home=home, scan_secrets=scan)
        timings[scan] = time.perf_counter() - start
    assert len(listing.files) == 20_000 - 400 + 1
    print(f"\nlist_context on 20,000 files: {timings[True]:.3f}s with the secret scan, "
          f"{timings[False]:.3f}s without")


def test_suggested_ignore_line_matches_only_that_file(project: Path, home: Path) -> None:
    write(project, "keys/[prod]*secret.txt", "x\n")
    write(project, "keys/Xsecret.txt", "x\n")
    listing = list_context(project, home=home)
    warning = next(w for w in listing.warnings if w.rel == "keys/[prod]*secret.txt")
    assert warning.ignore_line == "/keys/\\[prod]\\*secret.txt"
    write(project, ".stepflowignore", warning.ignore_line + "\n")
    assert shipped(list_context(project, home=home)) == [".stepflowignore", "app.py", "keys/Xsecret.txt"]
