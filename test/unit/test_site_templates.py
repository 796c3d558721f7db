"""
Every template file of the web site, as written (not only the pages a test
happens to render): no inline script, style element or attribute, event
handler or javascript: URL, which the Content-Security-Policy would refuse;
every POST form carries the CSRF field; nothing is marked safe from
escaping in a template; nothing loads from another host.
"""

import os
import re

import pytest

from cpushare.server.site import app

from test.unit.test_site_app import inlineCode

TEMPLATES = os.path.join(app.HERE, "templates")
NAMES = sorted(n for n in os.listdir(TEMPLATES) if n.endswith(".html"))
CSRF = '<input type="hidden" name="csrf" value="{{ csrf_token }}">'


def source(name):
    with open(os.path.join(TEMPLATES, name), encoding="utf-8") as f:
        return f.read()


def test_every_template_is_checked():
    assert {"base.html", "seller.html", "admin.html", "login.html"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_no_template_holds_inline_script_or_style(name):
    text = source(name)
    assert inlineCode(text) == [], name
    # A template expression could hide an attribute from the parser.
    assert not re.search(r"\bstyle\s*=", text), name
    assert not re.search(r"\bon[a-z]+\s*=", text), name


@pytest.mark.parametrize("name", NAMES)
def test_every_post_form_carries_the_csrf_field_and_nothing_is_unescaped(name):
    text = source(name)
    forms = re.findall(r"<form\b[^>]*>.*?</form>", text, re.S)
    for form in forms:
        if re.search(r'method="post"', form, re.I):
            assert CSRF in form, (name, form[:200])
    assert "|safe" not in text.replace(" ", "") and "autoescape false" not in text, name
    assert not re.search(r"""(src|href|action)=["']?(https?:)?//""", text), name
