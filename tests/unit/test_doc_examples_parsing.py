"""bench/doc_examples.py: which blocks of a page run, which block is their output, and how outputs compare."""

from __future__ import annotations

from bench.doc_examples import compare, json_values, parse

PAGE = """# A page

```bash
curl -s localhost:8000/readyz
```

It answers:

```json
{"status": "ready"}
```

<!-- not run: starts a server of its own -->
```bash
dynfuse serve
```

## Another section

```python
print("hello")
```

```text
hello
```

```
a plain block: neither run nor an output
```
"""


def test_runnable_blocks_their_outputs_and_the_ones_left_out(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    blocks = parse(page)
    assert [(b.lang, b.line) for b in blocks] == [("bash", 3), ("json", 9), ("bash", 14), ("python", 20), ("text", 24),
                                                  ("", 28)]  # fmt: skip
    curl, _, serve, python, _, _ = blocks
    assert curl.output.code == '{"status": "ready"}\n'
    assert serve.not_run == "starts a server of its own"
    assert serve.output is None
    assert python.output.lang == "text"


def test_a_heading_ends_the_search_for_an_output(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```bash\ntrue\n```\n\n## Next\n\n```json\n{}\n```\n")
    assert parse(page)[0].output is None


def test_answers_compare_by_value_volatile_fields_by_type_and_elisions_by_prefix():
    page = {"id": "2418b5ca", "model": "sha…", "label": "red_circle", "scores": {"red_circle": 0.97, "…": 0.0},
            "timing_ms": {"total": 2.0}, "compute": {"madds": 100}}  # fmt: skip
    same = {"id": "9f3e", "model": "shapes", "label": "red_circle",
            "scores": {"red_circle": 0.9705, "blue_square": 0.0295},
            "timing_ms": {"total": 17.3}, "compute": {"madds": 100}}  # fmt: skip
    assert compare(page, same, "") == []
    other = same | {"label": "red_cross", "compute": {"madds": 101}, "model": "other", "id": 7}
    assert compare(page, other, "") == [
        "id: 7 where the page shows a str",
        "model: 'other' does not start with 'sha'",
        "label: 'red_cross' where the page shows 'red_circle'",
        "compute.madds: 101 where the page shows 100",
    ]
    assert compare({"a": 1}, {"a": 1, "b": 2}, "") == ["the answer: has b, which the page does not show"]
    assert compare({"a": 0.5}, {"a": 0.51}, "") == ["a: 0.51 where the page shows 0.5"]


def test_several_answers_printed_one_after_another_are_each_read():
    assert json_values('{"a": 1}{"b": [2]}\n{"c": 3}\n') == [{"a": 1}, {"b": [2]}, {"c": 3}]
    assert json_values("not json") == []
