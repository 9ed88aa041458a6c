"""Pure helpers of the data plane: URL translation, target checks, header filtering."""

from __future__ import annotations

import pytest

from cpnd.http import HttpError, check_target, filter_headers, translate_target


@pytest.mark.parametrize(("target", "service", "url", "expected"), [
    (b"/yolo", "/yolo", "http://h:1/v1/detect", b"/v1/detect"),
    (b"/yolo/x/y?q=1", "/yolo", "http://h:1/v1/detect", b"/v1/detect/x/y?q=1"),
    (b"/yolo?q=1", "/yolo", "http://h:1/v1/detect/", b"/v1/detect/?q=1"),
    (b"/yolo/x", "/yolo", "http://h:1/", b"/x"),
    (b"/yolo", "/yolo", "http://h:1", b"/"),
    (b"/ai/llm/v1/chat", "/ai/llm/v1", "http://h:1/api?model=m", b"/api/chat?model=m"),
    (b"/ai/llm/v1/chat?stream=1", "/ai/llm/v1", "http://h:1/api?model=m", b"/api/chat?model=m&stream=1"),
])
def test_translate_target(target: bytes, service: str, url: str, expected: bytes) -> None:
    assert translate_target(target, service, url) == expected


@pytest.mark.parametrize("target", [b"http://x/yolo", b"*", b"/a/../b", b"/a/./b", b"/a/%2E%2E/b", b"/a%2fb", b"/a\\b",
                                    "/caf\u00e9".encode()])
def test_check_target_refuses_escapes(target: bytes) -> None:
    with pytest.raises(HttpError) as ei:
        check_target(target)
    assert ei.value.status == 400


def test_check_target_keeps_the_path() -> None:
    assert check_target(b"/yolo/x.y/..z?a=../b") == "/yolo/x.y/..z"


def test_filter_headers() -> None:
    headers = [(b"Host", b"x"), (b"Connection", b"keep-alive, X-Secret"), (b"X-Secret", b"1"), (b"Keep-Alive", b"5"),
               (b"Transfer-Encoding", b"chunked"), (b"TE", b"trailers"), (b"Upgrade", b"h2c"), (b"CPN-Max-Price", b"1"),
               (b"Accept", b"*/*"), (b"Expect", b"100-continue")]
    assert filter_headers(headers, drop_cpn=True) == [(b"Host", b"x"), (b"Accept", b"*/*")]
    assert (b"CPN-Max-Price", b"1") in filter_headers(headers, drop_cpn=False)
