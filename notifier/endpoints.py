"""Which Web Push endpoints the server may POST to: ``WEBPUSH_ALLOWED_HOSTS`` and ``check_endpoint``.

A browser's push subscription names the URL the server will later POST to, so the endpoint is
chosen by the caller and is a security boundary: without this check the server becomes a proxy
to any address of the caller's choosing (169.254.169.254, localhost, an internal service). An
endpoint is accepted only as an ``https://`` URL whose host and port an allowlist pattern
allows; the tricks that make two parsers see two different hosts are refused rather than
interpreted: userinfo (``https://fcm.googleapis.com@evil.example/``), percent-encoded hosts,
trailing dots, numeric shorthand IPv4 hosts (``2130706433``, ``0x7f.1``, ``127.1``,
``0177.0.0.1``), Unicode spellings that IDNA versions read differently, backslashes, control
characters.

Both the web layer (when a device registers) and the Web Push provider (before each POST, as
defence in depth: the allowlist may have shrunk since, or a row may not have come through the
web layer) call ``check_endpoint``. Standard library only, no I/O: names are compared as
written, without DNS; an allowed name is trusted to resolve to its owner's servers.
"""
from __future__ import annotations

import ipaddress
import re
import stringprep
import unicodedata
import urllib.parse
from dataclasses import dataclass

# The browsers' push services: Chrome (and other Chromium browsers) -> FCM, Firefox -> Mozilla
# autopush, Edge -> WNS (hosts like wns2-by3p.notify.windows.com), Safari -> web.push.apple.com.
# android.googleapis.com is left out on purpose: Chrome's legacy GCM endpoints were
# https://android.googleapis.com/gcm/send/..., but GCM was shut down in 2019 and current Chrome
# subscriptions are on fcm.googleapis.com; an operator who still has such subscriptions can add it.
DEFAULT_ALLOWED_HOSTS = (
    "fcm.googleapis.com,updates.push.services.mozilla.com,*.notify.windows.com,*.push.apple.com"
)
DEFAULT_PORT = 443
MAX_ENDPOINT_LENGTH = 2048
SCHEME_PREFIX = "https://"

MAX_HOST_LENGTH = 253
# one DNS label, letters-digits-hyphen (RFC 1123), compared lower-case
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# a last label a URL parser (WHATWG's "ends in a number") or inet_aton reads as a number
_NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9a-fA-F]*")
_PORT = re.compile(r"[0-9]{1,5}")
# C0 controls, space, DEL and backslash: browsers strip tabs and newlines and read "\" as "/"
# in https URLs, other parsers do not, so any of them lets two parsers disagree on the host
_FORBIDDEN_CHARACTERS = re.compile(r"[\x00-\x20\x7f\\]")


@dataclass(frozen=True)
class HostPattern:
    """One allowlist entry: an exact host (name or IP literal), or ``*.domain`` for its subdomains.

    ``host`` is lower-case ASCII without a trailing dot (an IP literal in its compressed form,
    without brackets); ``wildcard`` means "any name strictly below ``host``"; ``port`` is the only
    port allowed (443 when the pattern has none). Build them with ``parse_allowed_hosts``.
    """

    host: str
    wildcard: bool
    port: int


def parse_allowed_hosts(value: str) -> tuple[HostPattern, ...]:
    """Parse ``WEBPUSH_ALLOWED_HOSTS``: comma-separated ``host`` or ``*.domain``, each optionally ``:port``.

    Names are lower-cased, a trailing dot is dropped, a Unicode name is turned into its ASCII
    (punycode) form; an IP literal (``127.0.0.1:8443``, ``[::1]:8443``) is allowed only exactly.
    Raises ValueError naming the bad item (the value is configuration, not caller input).
    """
    if not isinstance(value, str) or not value.strip():
        raise ValueError("the list of allowed hosts is empty")
    return tuple(_parse_pattern(item.strip()) for item in value.split(","))


def check_endpoint(url: str, allowed: tuple[HostPattern, ...],
                   max_length: int = MAX_ENDPOINT_LENGTH) -> str:
    """Return the Web Push endpoint to store and POST to, or raise ValueError if it is not allowed.

    The URL is returned unchanged: the push service's path and query are opaque and must be
    POSTed back byte for byte, and every browser sends an ASCII host. The one exception is a
    non-ASCII host, which is returned in the ASCII (punycode) form that was compared, so the POST
    goes to the host that was checked whichever IDNA version the HTTP client would apply.
    The host comparison itself is on the normalised host (lower case, ASCII, parsed IP).

    The message of the ValueError never quotes the URL: it is the caller's, possibly huge or
    hostile, and ends up in logs and API answers.
    """
    if not isinstance(url, str):
        raise ValueError("the endpoint must be a string")
    if len(url) > max_length:
        raise ValueError(f"the endpoint is longer than {max_length} characters")
    if _FORBIDDEN_CHARACTERS.search(url):
        raise ValueError("the endpoint contains a control character, a space or a backslash")
    # lower-case only: RFC 3986 makes the scheme case-insensitive, but every browser serialises
    # "https://", and the stored string is the device's token, read as is by the provider
    if not url.startswith(SCHEME_PREFIX):
        raise ValueError("the endpoint must start with https://")
    # no push service puts "@" in an endpoint, and parsers have disagreed about an "@" past the
    # authority (userinfo or path?): refuse it anywhere rather than count on them agreeing
    if "@" in url:
        raise ValueError("the endpoint must not contain userinfo or '@'")
    if "#" in url:
        raise ValueError("the endpoint must not have a fragment")
    authority, rest = _split_authority(url[len(SCHEME_PREFIX):])
    if not rest.isascii():
        raise ValueError("the endpoint's path and query must be ASCII (percent-encoded)")
    host_text, port_text = _split_host_port(authority)
    if host_text.endswith("."):
        # "fcm.googleapis.com." may reach another virtual host (and certificate check) than the
        # name without the dot: refuse rather than compare something else than what is connected to
        raise ValueError("the endpoint's host must not end with a dot")
    host = _parse_host(host_text)
    port = DEFAULT_PORT if port_text is None else int(port_text)
    _check_urlsplit_agrees(url, host_text, port)
    if not any(_matches(pattern, host, port) for pattern in allowed):
        raise ValueError("the endpoint's host or port is not allowed")
    if host_text.isascii():
        return url
    port_suffix = "" if port_text is None else ":" + port_text
    return SCHEME_PREFIX + host + port_suffix + rest


def _parse_pattern(item: str) -> HostPattern:
    if not item:
        raise ValueError("the list of allowed hosts has an empty item "
                         "(two commas in a row, or a trailing comma)")
    try:
        return _pattern(item)
    except ValueError as exc:
        raise ValueError(f"allowed host {item!r}: {exc}") from None


def _pattern(item: str) -> HostPattern:
    if any(character in item for character in "/\\?#@"):
        raise ValueError("expected host or *.domain, optionally with :port, without a scheme or a path")
    if item == "*":
        raise ValueError("'*' alone would allow every host")
    wildcard = item.startswith("*.")
    body = item[2:] if wildcard else item
    if "*" in body:
        raise ValueError("a wildcard is allowed only as the whole first label, as in *.push.apple.com")
    host_text, port_text = _split_host_port(body)
    if host_text.endswith("."):
        # the operator's "fcm.googleapis.com." means the name; endpoints with the dot stay refused
        host_text = host_text[:-1]
    host = _parse_host(host_text)
    if wildcard and not isinstance(host, str):
        raise ValueError("a wildcard cannot apply to an IP address")
    if wildcard and "." not in host:
        # "*.com" would allow a whole top-level domain (not a full public-suffix check: "*.co.uk"
        # still passes, so an operator writing a wildcard must know whose zone it is)
        raise ValueError("a wildcard needs at least two labels after '*.'")
    port = DEFAULT_PORT if port_text is None else int(port_text)
    return HostPattern(host=str(host), wildcard=wildcard, port=port)


def _split_authority(after_scheme: str) -> tuple[str, str]:
    """Cut "host[:port]" from the path and query: the authority ends at the first "/" or "?"."""
    for index, character in enumerate(after_scheme):
        if character in "/?":
            return after_scheme[:index], after_scheme[index:]
    return after_scheme, ""


def _split_host_port(authority: str) -> tuple[str, str | None]:
    """Split "host", "host:port", "[v6]" or "[v6]:port"; the port is checked, not converted."""
    if "%" in authority:
        # a percent-encoded host is decoded by some parsers (fcm%2egoogleapis%2ecom) and not by
        # others; in brackets it would be an IPv6 zone id, which ipaddress accepts
        raise ValueError("the host must not be percent-encoded")
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise ValueError("an IPv6 address is missing its closing ']'")
        host, after = authority[:end + 1], authority[end + 1:]
        if after and not after.startswith(":"):
            raise ValueError("unexpected text after an IPv6 address")
        port = after[1:] if after else None
    else:
        if "[" in authority or "]" in authority:
            raise ValueError("brackets are only for an IPv6 address")
        if authority.count(":") > 1:
            raise ValueError("more than one ':' (an IPv6 address must be in brackets, as in [::1]:8443)")
        host, sep, port = authority.partition(":")
        port = port if sep else None
    if not host:
        raise ValueError("no host")
    if port is not None and (not _PORT.fullmatch(port) or not 0 < int(port) < 65536):
        raise ValueError("the port must be a number from 1 to 65535")
    return host, port


def _parse_host(text: str) -> str | ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A bracketed IPv6 literal, a dotted-quad IPv4 literal, or a name in lower-case ASCII."""
    if text.startswith("["):
        try:
            return ipaddress.IPv6Address(text[1:-1])
        except ValueError:
            raise ValueError("not a valid IPv6 address in brackets") from None
    name = _ascii_name(text)
    labels = name.split(".")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        # to a URL parser or a resolver (inet_aton) this is an IPv4 address in some notation;
        # only the plain dotted quad (no leading zeros: ipaddress refuses them) means one thing
        try:
            return ipaddress.IPv4Address(name)
        except ValueError:
            raise ValueError("a numeric host must be a dotted-quad IPv4 address") from None
    if len(name) > MAX_HOST_LENGTH or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError("the host is not a valid DNS name")
    return name


def _ascii_name(text: str) -> str:
    """The name in lower-case ASCII; a Unicode name through the standard library's IDNA codec.

    The codec (``encodings.idna``, the same thing as ``str.encode("idna")``) implements IDNA 2003
    (RFC 3490, nameprep over Unicode 3.2). Browsers, the ``idna`` package and the HTTP clients
    built on it (httpx, aiohttp's yarl) implement IDNA 2008 / UTS #46, and the two disagree:
    "faß.de" is fass.de to one and xn--fa-hia.de to the other; the codec also maps fullwidth
    letters to ASCII ("ｌｏｃａｌｈｏｓｔ" -> localhost), splits on "。", turns "⒈" into "1.",
    deletes zero-width joiners, and passes code points unassigned in Unicode 3.2 unmapped, where
    UTS #46 maps some of them. So neither "handles Unicode hostnames correctly" on its own. We
    accept a Unicode label only when the codec leaves it as it is (the round trip gives the same
    text back), every character is assigned in Unicode 3.2, and today's NFKC casefold leaves it
    alone too: anything the two standards could read differently is refused rather than guessed.
    ``check_endpoint`` returns the URL with this ASCII form, to be stored, so the POST goes to
    exactly the name compared here whatever the client's IDNA version.
    """
    lowered = text.lower()
    if lowered.isascii():
        return lowered
    try:
        ascii_name = lowered.encode("idna").decode("ascii")
        round_trip = ascii_name.encode("ascii").decode("idna")
    except UnicodeError:
        raise ValueError("the host is not a valid internationalised domain name") from None
    unassigned = any(stringprep.in_table_a1(character) for character in lowered)
    # IDNA 2003 maps with Unicode 3.2's tables, UTS #46 with today's (NFKC_Casefold): a label
    # that today's casefold and NFKC leave alone as well is one both read the same
    modern = unicodedata.normalize("NFKC", lowered.casefold())
    if round_trip != lowered or unassigned or modern != lowered:
        raise ValueError("the host is a Unicode spelling that IDNA versions read differently")
    return ascii_name


def _check_urlsplit_agrees(url: str, host_text: str, port: int) -> None:
    # the provider (and most Python code) reads the host and port back with urlsplit; if it ever
    # disagreed with the parser above, refuse rather than decide which one is right
    try:
        parts = urllib.parse.urlsplit(url)
        split_port = parts.port
    except ValueError:
        raise ValueError("the endpoint is not a valid URL") from None
    if parts.hostname != host_text.strip("[]").lower() or (split_port or DEFAULT_PORT) != port:
        raise ValueError("the endpoint's host is ambiguous")


def _matches(pattern: HostPattern, host: str | ipaddress.IPv4Address | ipaddress.IPv6Address,
             port: int) -> bool:
    if port != pattern.port:
        return False
    if not isinstance(host, str):
        # an IP literal matches only the same address, never a name or a wildcard pattern
        return not pattern.wildcard and _pattern_address(pattern) == host
    if pattern.wildcard:
        # strictly below the domain: web.push.apple.com, not push.apple.com nor evilpush.apple.com
        return host.endswith("." + pattern.host)
    return host == pattern.host


def _pattern_address(pattern: HostPattern) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(pattern.host)
    except ValueError:
        return None
