"""A user names images the way Docker does; ocibox understands exactly the same names.

The table restates the grammar of the distribution project's reference package and the cases of
its reference and normalize tests (Debian's golang-github-docker-distribution-dev), in our words.
"""

import pytest

from ocibox import reference
from ocibox.errors import InvalidReference

F64 = "f" * 64

VALID = [
    # (what the user types, normalised reference, familiar form)
    ("alpine", "docker.io/library/alpine:latest", "alpine:latest"),
    ("alpine:3.19", "docker.io/library/alpine:3.19", "alpine:3.19"),
    ("user/app", "docker.io/user/app:latest", "user/app:latest"),
    ("docker.io/library/alpine", "docker.io/library/alpine:latest", "alpine:latest"),
    ("docker.io/alpine", "docker.io/library/alpine:latest", "alpine:latest"),
    ("index.docker.io/user/app:1", "docker.io/user/app:1", "user/app:1"),
    ("host:5000/a/b:tag", "host:5000/a/b:tag", "host:5000/a/b:tag"),
    ("localhost/x", "localhost/x:latest", "localhost/x:latest"),
    ("localhost:5000/x", "localhost:5000/x:latest", "localhost:5000/x:latest"),
    (
        "127.0.0.1:5000/test/busybox",
        "127.0.0.1:5000/test/busybox:latest",
        "127.0.0.1:5000/test/busybox:latest",
    ),
    ("test_com", "docker.io/library/test_com:latest", "test_com:latest"),
    ("test.com:tag", "docker.io/library/test.com:tag", "test.com:tag"),
    ("test.com:5000", "docker.io/library/test.com:5000", "test.com:5000"),
    ("test.com/repo:tag", "test.com/repo:tag", "test.com/repo:tag"),
    ("test:5000/repo", "test:5000/repo:latest", "test:5000/repo:latest"),
    (f"test:5000/repo@sha256:{F64}", f"test:5000/repo@sha256:{F64}", f"test:5000/repo@sha256:{F64}"),
    (
        f"test:5000/repo:tag@sha256:{F64}",
        f"test:5000/repo:tag@sha256:{F64}",
        f"test:5000/repo:tag@sha256:{F64}",
    ),
    (f"alpine@sha256:{F64}", f"docker.io/library/alpine@sha256:{F64}", f"alpine@sha256:{F64}"),
    ("lowercase:Uppercase", "docker.io/library/lowercase:Uppercase", "lowercase:Uppercase"),
    ("sub-dom1.foo.com/bar/baz/quux:some-long-tag", "sub-dom1.foo.com/bar/baz/quux:some-long-tag", None),
    (
        "b.gcr.io/test.example.com/my-app:test.example.com",
        "b.gcr.io/test.example.com/my-app:test.example.com",
        None,
    ),
    ("xn--n3h.com/myimage:xn--n3h.com", "xn--n3h.com/myimage:xn--n3h.com", None),
    ("foo_bar.com:8080", "docker.io/library/foo_bar.com:8080", None),
    ("foo/foo_bar.com:8080", "docker.io/foo/foo_bar.com:8080", None),
    ("a__b/c-d---e.f_g", "docker.io/a__b/c-d---e.f_g:latest", None),
    ("[::1]:5000/x", "[::1]:5000/x:latest", None),
    # 255 characters of name with the registry: the longest allowed; the tag does not count.
    ("a/" * 122 + "a:tag-puts-this-over-max", "docker.io/" + "a/" * 122 + "a:tag-puts-this-over-max", None),
]

INVALID = [
    # (what the user types, a word the error message must contain)
    ("", "empty"),
    (":justtag", "invalid reference format"),
    (f"@sha256:{F64}", "invalid reference format"),
    ("repo@sha256:" + "f" * 34, "64"),
    (f"validname@invaliddigest:{F64}", "unsupported algorithm"),
    ("Uppercase:tag", "lowercase"),
    ("Uppercase/lowercase:tag", "lowercase"),
    ("test:5000/Uppercase/lowercase:tag", "lowercase"),
    ("a/" * 128 + "a:tag", "255"),
    ("a/" * 123 + "a", "255"),
    ("aa/asdf$$^/aa", "invalid reference format"),
    (F64, "64-byte hexadecimal"),
    ("repo:" + "t" * 129, "invalid reference format"),
    ("repo:-tag", "invalid reference format"),
    ("-repo", "invalid reference format"),
    ("repo/", "invalid reference format"),
    ("repo//x", "invalid reference format"),
    ("repo@sha256:" + "F" * 64, "lowercase hex"),
    ("host:port/x", "invalid reference format"),
]


@pytest.mark.parametrize(("text", "normalised", "familiar"), VALID)
def test_a_user_names_an_image_like_docker(text, normalised, familiar):
    ref = reference.parse(text)
    assert str(ref) == normalised
    if familiar is not None:
        assert ref.familiar == familiar
    # Normalising is idempotent.
    assert str(reference.parse(normalised)) == normalised


@pytest.mark.parametrize(("text", "message"), INVALID)
def test_a_bad_reference_is_refused_with_a_clear_message(text, message):
    with pytest.raises(InvalidReference) as info:
        reference.parse(text)
    assert message in str(info.value)


def test_docker_hub_is_reached_at_its_api_host():
    assert reference.parse("alpine").api_host == "registry-1.docker.io"
    assert reference.parse("quay.io/x/y").api_host == "quay.io"


def test_a_digest_wins_over_a_tag_when_fetching():
    ref = reference.parse(f"repo:tag@sha256:{F64}")
    assert ref.tag == "tag"
    assert ref.identifier == f"sha256:{F64}"
    assert reference.parse("repo").identifier == "latest"
