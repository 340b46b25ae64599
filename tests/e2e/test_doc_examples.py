"""Every shell and Python example of README.md and docs/*.md, run as written against the shipped default model,
prints what the page says it prints (bench/doc_examples.py). An example a page adds later is picked up too."""

from __future__ import annotations

import pytest

from bench import doc_examples

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
PAGES = doc_examples.pages()


@pytest.fixture(scope="module")
def results() -> dict:
    by_page: dict = {page.name: [] for page in PAGES}
    for result in doc_examples.run_pages(PAGES):
        by_page[result.block.page.name].append(result)
    return by_page


@pytest.mark.parametrize("page", [p.name for p in PAGES])
def test_the_examples_of_the_page_run_and_print_what_it_says(results, page):
    problems = [problem for result in results[page] for problem in result.problems]
    assert problems == [], "\n\n".join(problems) + "\n(python -m bench.doc_examples --update writes new outputs)"


def test_the_readme_request_and_its_answer_are_checked(results):
    readme = results["README.md"]
    assert len(readme) >= 2, "the README's request examples did not run"
    assert all(result.block.output is not None and result.block.output.lang == "json" for result in readme)


def test_an_example_left_out_says_why():
    for page in PAGES:
        for block in doc_examples.parse(page):
            if block.not_run is not None:
                assert len(block.not_run.split()) >= 3, f"{page.name}:{block.line}: say why it is not run"
