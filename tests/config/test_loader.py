"""Reading config files: documents, the line of every field, YAML problems."""

from pathlib import Path
from textwrap import dedent

import pytest

from gmesh.config.loader import Document, format_path, load_paths, load_text
from gmesh.errors import Problem

NESTED = dedent(
    """\
    kind: Service
    metadata:
      name: orders
      labels:
        team: pay
    spec:
      items:
        - name: a
          port: 1
        - name: b

          port: 2
      flow: {x: 1,
             y: 2}
    """
)


def test_multiple_documents_and_empty_ones_skipped() -> None:
    text = "kind: A\n---\n---\n# only a comment\n---\nkind: B\nmetadata:\n  name: b\n---\n"
    docs, problems = load_text(text, "multi.yaml")
    assert problems == []
    assert [(d.file, d.line, d.data) for d in docs] == [
        ("multi.yaml", 1, {"kind": "A"}),
        ("multi.yaml", 6, {"kind": "B", "metadata": {"name": "b"}}),
    ]


def test_empty_text_has_no_documents() -> None:
    assert load_text("", "empty.yaml") == ([], [])
    assert load_text("# nothing here\n", "empty.yaml") == ([], [])


@pytest.mark.parametrize(
    ("path", "line"),
    [
        ((), 1),
        (("kind",), 1),
        (("metadata",), 2),
        (("metadata", "name"), 3),
        (("metadata", "labels", "team"), 5),
        (("spec", "items"), 7),
        (("spec", "items", 0), 8),
        (("spec", "items", 0, "port"), 9),
        (("spec", "items", 1), 10),
        (("spec", "items", 1, "port"), 12),
        (("spec", "flow", "y"), 14),
    ],
)
def test_line_of_nested_paths(path: tuple[str | int, ...], line: int) -> None:
    [doc], _ = load_text(NESTED, "svc.yaml")
    assert doc.line_of(path) == line


@pytest.mark.parametrize(
    ("path", "line"),
    [
        (("metadata", "missing"), 2),
        (("metadata", "labels", "missing", "deeper"), 4),
        (("spec", "items", 1, "missing"), 10),
        (("spec", "items", 5), 7),
        (("nowhere",), 1),
    ],
)
def test_line_of_missing_child_falls_back_to_parent(path: tuple[str | int, ...], line: int) -> None:
    [doc], _ = load_text(NESTED, "svc.yaml")
    assert doc.line_of(path) == line


def test_line_of_in_a_later_document() -> None:
    docs, _ = load_text("a: 1\n---\nkind: B\nspec:\n  x: 1\n", "f.yaml")
    assert docs[1].line == 3
    assert docs[1].line_of(("spec", "x")) == 5
    assert docs[1].line_of(("spec", "y")) == 4


def test_line_of_without_lines_is_the_document_line() -> None:
    assert Document("f.yaml", 7, {"a": 1}).line_of(("a",)) == 7


@pytest.mark.parametrize(
    ("path", "text"),
    [
        ((), ""),
        (("spec",), "spec"),
        (("spec", "items", 0, "port"), "spec.items[0].port"),
        ((0, "a"), "[0].a"),
    ],
)
def test_format_path(path: tuple[str | int, ...], text: str) -> None:
    assert format_path(path) == text


def test_duplicate_keys_are_problems_with_lines() -> None:
    text = "kind: Service\nmetadata:\n  name: a\n  labels: {}\n  name: b\nkind: Route\n"
    docs, problems = load_text(text, "dup.yaml")
    assert problems == [
        Problem("dup.yaml", 5, "metadata.name", "duplicate key (first at line 3)"),
        Problem("dup.yaml", 6, "kind", "duplicate key (first at line 1)"),
    ]
    assert len(docs) == 1


def test_yaml_1_2_booleans() -> None:
    text = "on: [UNAVAILABLE]\nyes: no\noff: y\nflag: true\nother: False\nupper: TRUE\n"
    [doc], problems = load_text(text, "retry.yaml")
    assert problems == []
    assert doc.data == {
        "on": ["UNAVAILABLE"],
        "yes": "no",
        "off": "y",
        "flag": True,
        "other": False,
        "upper": True,
    }


def test_other_scalars_keep_their_yaml_types() -> None:
    [doc], _ = load_text("n: 2\nf: 1.5\nz: null\nversion: '2'\n", "f.yaml")
    assert doc.data == {"n": 2, "f": 1.5, "z": None, "version": "2"}


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("ok: 1\nbad: a: b\n", 2, "invalid YAML: mapping values are not allowed here"),
        ("a: [1, 2\nb: 3\n", 2, "invalid YAML: expected ',' or ']', but got ':'"),
        ("\tx: 1\n", 1, "invalid YAML: found character '\\t' that cannot start any token"),
        ("a:\n  - x\n - y\n", 3, "invalid YAML: expected <block end>, but found '<block sequence start>'"),
    ],
)
def test_invalid_yaml_is_a_problem_with_a_line(text: str, line: int, message: str) -> None:
    docs, problems = load_text(text, "bad.yaml")
    assert docs == []
    assert problems == [Problem("bad.yaml", line, "", message)]


def test_documents_before_invalid_yaml_are_kept() -> None:
    docs, problems = load_text("a: 1\n---\nb: c: d\n", "bad.yaml")
    assert [d.data for d in docs] == [{"a": 1}]
    assert [(p.line, p.message) for p in problems] == [
        (3, "invalid YAML: mapping values are not allowed here")
    ]


def test_recursive_alias_is_a_problem_not_a_crash() -> None:
    docs, problems = load_text("a: &loop [*loop]\n", "loop.yaml")
    assert docs == []
    assert [(p.file, p.line) for p in problems] == [("loop.yaml", 1)]


def test_load_paths_directory(tmp_path: Path) -> None:
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "dir.yaml").mkdir()  # a directory, not a config file
    files = {
        "b.yaml": "name: b\n",
        "a.yml": "name: a\n---\nname: a2\n",
        "z.json": '{"name": "z"}',
        "notes.txt": "name: txt\n",
        "README.md": "name: md\n",
        "sub/c.json": '{"name": "c"}',
        "sub/deeper/d.yaml": "name: d\n",
        "sub/e.YAML": "name: upper\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    docs, problems = load_paths([tmp_path])
    assert problems == []
    assert [(Path(d.file).relative_to(tmp_path).as_posix(), d.data["name"]) for d in docs] == [
        ("a.yml", "a"),
        ("a.yml", "a2"),
        ("b.yaml", "b"),
        ("sub/c.json", "c"),
        ("sub/deeper/d.yaml", "d"),
        ("z.json", "z"),
    ]


def test_load_paths_file_lines_and_problems(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("# header\nkind: Service\n")
    bad = tmp_path / "bad.yml"
    bad.write_text("kind: [\n")
    docs, problems = load_paths([good, bad])
    assert [(d.file, d.line) for d in docs] == [(str(good), 2)]
    assert [(p.file, p.line) for p in problems] == [(str(bad), 2)]


def test_load_paths_missing_and_empty(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x: 1\n")
    docs, problems = load_paths([missing, empty])
    assert docs == []
    assert problems == [
        Problem(str(missing), None, "", "no such file or directory"),
        Problem(str(empty), None, "", "no .yaml, .yml or .json files in this directory"),
    ]


def test_load_paths_undecodable_file(tmp_path: Path) -> None:
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"name: caf\xe9\n")
    docs, problems = load_paths([latin])
    assert docs == []
    assert len(problems) == 1
    assert (problems[0].file, problems[0].line) == (str(latin), None)
    assert problems[0].message.startswith("cannot read: ")
