"""check_endpoint() and parse_allowed_hosts(): the server never POSTs outside WEBPUSH_ALLOWED_HOSTS."""
import pytest

from notifier.endpoints import (
    DEFAULT_ALLOWED_HOSTS, HostPattern, check_endpoint, parse_allowed_hosts)

DEFAULT = parse_allowed_hosts(DEFAULT_ALLOWED_HOSTS)
# the default list plus what tests and odd deployments use: IP literals on a test port, a name
# on another port, and an internationalised name
CUSTOM = parse_allowed_hosts(
    "127.0.0.1:8443,[::1]:8443,push.example.com:8443,*.wild.example.com:9443,bücher.example")

# --- accepted, returned unchanged
ACCEPTED = [
    # the browsers' real endpoint shapes
    (DEFAULT, "https://fcm.googleapis.com/fcm/send/dGVzdA:APA91bHun4MxP5egoKMwt2KZFBaFUH-1RYqx"),
    (DEFAULT, "https://updates.push.services.mozilla.com/wpush/v2/gAAAAABmQ2x0ZXN0LXRva2Vu"),
    (DEFAULT, "https://wns2-by3p.notify.windows.com/w/?token=BQYAAAD%2bRBzLkR0b%2fQ%3d%3d"),
    (DEFAULT, "https://web.push.apple.com/QGuQyavXutnMH2Nb5W-o9fkPTYQ1cK2jHL"),
    # wildcards: any depth strictly below the domain
    (DEFAULT, "https://a.b.push.apple.com/x"),
    (DEFAULT, "https://db5p.notify.windows.com/w/?token=abc"),
    # an explicit :443 is the same as none for a pattern without a port
    (DEFAULT, "https://fcm.googleapis.com:443/fcm/send/x"),
    # a query is allowed, a path is not required
    (DEFAULT, "https://fcm.googleapis.com/fcm/send/x?a=1&b=2"),
    (DEFAULT, "https://fcm.googleapis.com"),
    (DEFAULT, "https://fcm.googleapis.com?x=1"),
    # DNS names are case-insensitive: compared lower-case, stored as sent
    (DEFAULT, "https://FCM.GoogleAPIs.com/fcm/send/x"),
    # IP literals and other ports, only where a pattern says so
    (CUSTOM, "https://127.0.0.1:8443/push/1"),
    (CUSTOM, "https://[::1]:8443/push/1"),
    (CUSTOM, "https://[0:0::1]:8443/push/1"),
    (CUSTOM, "https://push.example.com:8443/push/1"),
    (CUSTOM, "https://a.wild.example.com:9443/push/1"),
    (CUSTOM, "https://xn--bcher-kva.example/push/1"),
    # all-digit labels that are not the last label are plain DNS names
    (DEFAULT, "https://123.push.apple.com/x"),
]


@pytest.mark.parametrize("allowed, url", ACCEPTED)
def test_allowed_endpoint_is_returned_unchanged(allowed, url):
    assert check_endpoint(url, allowed) == url


# a Unicode host matches by its punycode form: "wеb" with a Cyrillic е is xn--wb-nlc, a name
# inside Apple's zone, so *.push.apple.com allows it
@pytest.mark.parametrize("allowed, url, stored", [
    (DEFAULT, "https://wеb.push.apple.com/x?y", "https://xn--wb-nlc.push.apple.com/x?y"),
    (CUSTOM, "https://bücher.example/push/1", "https://xn--bcher-kva.example/push/1"),
    (CUSTOM, "https://BÜCHER.example/push/1", "https://xn--bcher-kva.example/push/1"),
])
def test_unicode_host_is_stored_in_the_ascii_form_that_was_compared(allowed, url, stored):
    assert check_endpoint(url, allowed) == stored
    # the stored form passes again unchanged (the provider checks before each POST)
    assert check_endpoint(stored, allowed) == stored


# --- refused
REFUSED = [
    # not https, or not written "https://"
    (DEFAULT, "http://fcm.googleapis.com/fcm/send/x", "https://"),
    (DEFAULT, "HTTPS://fcm.googleapis.com/fcm/send/x", "https://"),
    (DEFAULT, "ftp://fcm.googleapis.com/x", "https://"),
    (DEFAULT, "//fcm.googleapis.com/x", "https://"),
    (DEFAULT, "https:fcm.googleapis.com/x", "https://"),
    (DEFAULT, "https:/fcm.googleapis.com/x", "https://"),
    (DEFAULT, "fcm.googleapis.com/fcm/send/x", "https://"),
    (DEFAULT, "", "https://"),
    # userinfo, and "@" anywhere
    (DEFAULT, "https://user@fcm.googleapis.com/x", "userinfo"),
    (DEFAULT, "https://user:pass@fcm.googleapis.com/x", "userinfo"),
    (DEFAULT, "https://fcm.googleapis.com@evil.example/x", "userinfo"),
    (DEFAULT, "https://fcm.googleapis.com:443@evil.example/x", "userinfo"),
    (DEFAULT, "https://@fcm.googleapis.com/x", "userinfo"),
    (DEFAULT, "https://fcm.googleapis.com/x?@evil.example", "userinfo"),
    # control characters, spaces, backslashes anywhere
    (DEFAULT, "https://fcm.googleapis.com/x\r\nHost: evil.example", "control"),
    (DEFAULT, "https://fcm.googleapis.com\t/x", "control"),
    (DEFAULT, "https://fcm.googleapis.com/x y", "control"),
    (DEFAULT, " https://fcm.googleapis.com/x", "control"),
    (DEFAULT, "https://fcm.googleapis.com/x\x00", "control"),
    (DEFAULT, "https://fcm.googleapis.com/x\x7f", "control"),
    (DEFAULT, "https://evil.example\\@fcm.googleapis.com/x", "control"),
    (DEFAULT, "https://evil.example\\.push.apple.com/x", "control"),
    # a fragment
    (DEFAULT, "https://fcm.googleapis.com/fcm/send/x#frag", "fragment"),
    (DEFAULT, "https://evil.example#.push.apple.com", "fragment"),
    # no host
    (DEFAULT, "https://", "no host"),
    (DEFAULT, "https:///fcm/send/x", "no host"),
    (DEFAULT, "https://:443/x", "no host"),
    (DEFAULT, "https://?x=1", "no host"),
    # percent-encoded hosts and IPv6 zone ids
    (DEFAULT, "https://fcm%2egoogleapis%2ecom/x", "percent"),
    (DEFAULT, "https://%66cm.googleapis.com/x", "percent"),
    (CUSTOM, "https://[::1%25lo]:8443/x", "percent"),
    # a trailing dot: refused, not normalised
    (DEFAULT, "https://fcm.googleapis.com./fcm/send/x", "dot"),
    (DEFAULT, "https://web.push.apple.com.:443/x", "dot"),
    # ports: a pattern without a port allows only 443
    (DEFAULT, "https://fcm.googleapis.com:8443/x", "not allowed"),
    (DEFAULT, "https://fcm.googleapis.com:80/x", "not allowed"),
    (DEFAULT, "https://fcm.googleapis.com:0/x", "port"),
    (DEFAULT, "https://fcm.googleapis.com:65536/x", "port"),
    (DEFAULT, "https://fcm.googleapis.com:/x", "port"),
    (DEFAULT, "https://fcm.googleapis.com:44a/x", "port"),
    (DEFAULT, "https://fcm.googleapis.com:+443/x", "port"),
    (DEFAULT, "https://fcm.googleapis.com:٤٤٣/x", "port"),
    (DEFAULT, "https://fcm.googleapis.com:443:443/x", "':'"),
    (CUSTOM, "https://push.example.com/push/1", "not allowed"),
    (CUSTOM, "https://push.example.com:9443/push/1", "not allowed"),
    (CUSTOM, "https://127.0.0.1/push/1", "not allowed"),
    # wildcards: strictly below the domain, on label boundaries
    (DEFAULT, "https://push.apple.com/x", "not allowed"),
    (DEFAULT, "https://evilpush.apple.com/x", "not allowed"),
    (DEFAULT, "https://push.apple.com.evil.example/x", "not allowed"),
    (DEFAULT, "https://web.push.apple.com.evil.example/x", "not allowed"),
    (DEFAULT, "https://notify.windows.com/w/?token=x", "not allowed"),
    (DEFAULT, "https://fcm.googleapis.com.evil.example/x", "not allowed"),
    (DEFAULT, "https://evil-fcm.googleapis.com/x", "not allowed"),
    (DEFAULT, "https://sub.fcm.googleapis.com/x", "not allowed"),
    (DEFAULT, "https://googleapis.com/x", "not allowed"),
    # internal addresses are simply not in the list
    (DEFAULT, "https://localhost/x", "not allowed"),
    (DEFAULT, "https://169.254.169.254/latest/meta-data/", "not allowed"),
    (DEFAULT, "https://[::1]/x", "not allowed"),
    (DEFAULT, "https://[::ffff:169.254.169.254]/x", "not allowed"),
    (DEFAULT, "https://metadata.google.internal/computeMetadata/v1/", "not allowed"),
    (DEFAULT, "https://127.0.0.1/x", "not allowed"),
    (CUSTOM, "https://localhost:8443/x", "not allowed"),
    (CUSTOM, "https://[::ffff:127.0.0.1]:8443/x", "not allowed"),
    (CUSTOM, "https://127.0.0.2:8443/x", "not allowed"),
    # numeric shorthand hosts are IPv4 addresses to a resolver: refused outright
    (DEFAULT, "http://2130706433/", "https://"),
    (DEFAULT, "https://2130706433/", "dotted-quad"),
    (CUSTOM, "https://2130706433:8443/", "dotted-quad"),
    (CUSTOM, "https://0x7f.1:8443/", "dotted-quad"),
    (CUSTOM, "https://0x7f000001:8443/", "dotted-quad"),
    (CUSTOM, "https://127.1:8443/", "dotted-quad"),
    (CUSTOM, "https://0177.0.0.1:8443/", "dotted-quad"),
    (CUSTOM, "https://127.000.0.1:8443/", "dotted-quad"),
    (CUSTOM, "https://127.0.0.1.1:8443/", "dotted-quad"),
    (CUSTOM, "https://0x7f.0x0.0x0.0x1:8443/", "dotted-quad"),
    (DEFAULT, "https://web.push.apple.0x63/", "dotted-quad"),
    (DEFAULT, "https://web.push.apple.123/", "dotted-quad"),
    # broken brackets and IPv6
    (CUSTOM, "https://::1:8443/x", "':'"),
    (CUSTOM, "https://[::1:8443/x", "']'"),
    (CUSTOM, "https://[::1]x:8443/x", "after an IPv6"),
    (CUSTOM, "https://[127.0.0.1]:8443/x", "IPv6"),
    (CUSTOM, "https://[v1.fe80::a]:8443/x", "IPv6"),
    (CUSTOM, "https://fe80]:8443/x", "brackets"),
    # not a DNS name
    (DEFAULT, "https://web_x.push.apple.com/x", "DNS name"),
    (DEFAULT, "https://-web.push.apple.com/x", "DNS name"),
    (DEFAULT, "https://web..push.apple.com/x", "DNS name"),
    (DEFAULT, "https://" + "a" * 64 + ".push.apple.com/x", "DNS name"),
    (DEFAULT, "https://" + "a." * 120 + "push.apple.com/x", "DNS name"),
    # Unicode look-alikes compare by their punycode form, which is not on the list
    (DEFAULT, "https://fcm.googleapis.cоm/fcm/send/x", "not allowed"),      # Cyrillic о
    (DEFAULT, "https://fcm.googleаpis.com/fcm/send/x", "not allowed"),      # Cyrillic а
    (DEFAULT, "https://wеb.push.apple.cоm/x", "not allowed"),
    # Unicode spellings IDNA 2003 and IDNA 2008 read differently: refused, not guessed
    (DEFAULT, "https://ｆｃｍ.googleapis.com/fcm/send/x", "IDNA"),           # fullwidth -> fcm
    (DEFAULT, "https://ｌｏｃａｌｈｏｓｔ/x", "IDNA"),                          # fullwidth -> localhost
    (DEFAULT, "https://１２７.０.０.１/x", "IDNA"),                          # fullwidth digits
    (DEFAULT, "https://evil。push.apple.com/x", "IDNA"),                    # ideographic full stop
    (DEFAULT, "https://evil．push.apple.com/x", "IDNA"),                    # fullwidth full stop
    (DEFAULT, "https://faß.push.apple.com/x", "IDNA"),                      # fass / xn--fa-hia
    (DEFAULT, "https://ς.push.apple.com/x", "IDNA"),                        # final sigma
    (DEFAULT, "https://a\u200db.push.apple.com/x", "IDNA"),                 # zero-width joiner
    (DEFAULT, "https://a⒈push.apple.com/x", "IDNA"),                        # becomes "a1."
    (DEFAULT, "https://\U0001f100.push.apple.com/x", "IDNA"),               # unassigned in Unicode 3.2
    (DEFAULT, "https://\u04c0.push.apple.com/x", "IDNA"),                   # palochka: lower case U+04CF is newer than 3.2
    (DEFAULT, "https://" + "ü" * 64 + ".push.apple.com/x", "internationalised"),
    # non-ASCII outside the host: browsers percent-encode it
    (DEFAULT, "https://fcm.googleapis.com/fcm/send/é", "ASCII"),
    (DEFAULT, "https://fcm.googleapis.com/x?\u2028", "ASCII"),
]


@pytest.mark.parametrize("allowed, url, reason", REFUSED)
def test_refused_endpoint_raises_without_quoting_the_url(allowed, url, reason):
    with pytest.raises(ValueError, match=reason) as caught:
        check_endpoint(url, allowed)
    message = str(caught.value)
    if len(url) > len("https://"):   # "" and "https://" alone are in any message
        assert url not in message
    host = url.partition("://")[2].split("/")[0]
    if len(host) > 3:
        assert host not in message


@pytest.mark.parametrize("value", [None, b"https://fcm.googleapis.com/x", 42])
def test_non_string_endpoint_is_refused(value):
    with pytest.raises(ValueError, match="string"):
        check_endpoint(value, DEFAULT)


def _endpoint_of_length(length):
    prefix = "https://fcm.googleapis.com/fcm/send/"
    return prefix + "A" * (length - len(prefix))


def test_2048_characters_are_accepted():
    url = _endpoint_of_length(2048)
    assert check_endpoint(url, DEFAULT) == url


def test_2049_characters_are_refused_without_quoting_the_url():
    url = _endpoint_of_length(2049)
    with pytest.raises(ValueError, match="longer than 2048") as caught:
        check_endpoint(url, DEFAULT)
    assert "AAAA" not in str(caught.value)


def test_max_length_is_a_parameter():
    url = _endpoint_of_length(100)
    assert check_endpoint(url, DEFAULT, max_length=100) == url
    with pytest.raises(ValueError, match="longer than 99"):
        check_endpoint(url, DEFAULT, max_length=99)


def test_a_huge_hostile_endpoint_is_not_echoed():
    url = "https://evil.example/" + "<script>SECRET</script>" * 80
    with pytest.raises(ValueError) as caught:
        check_endpoint(url, DEFAULT)
    assert "SECRET" not in str(caught.value) and "evil" not in str(caught.value)


def test_an_empty_allowlist_allows_nothing():
    with pytest.raises(ValueError, match="not allowed"):
        check_endpoint("https://fcm.googleapis.com/fcm/send/x", ())


# --- parse_allowed_hosts
def test_default_list_parses_to_the_four_push_services():
    assert DEFAULT == (
        HostPattern("fcm.googleapis.com", False, 443),
        HostPattern("updates.push.services.mozilla.com", False, 443),
        HostPattern("notify.windows.com", True, 443),
        HostPattern("push.apple.com", True, 443),
    )


@pytest.mark.parametrize("value, expected", [
    ("fcm.googleapis.com", (HostPattern("fcm.googleapis.com", False, 443),)),
    ("FCM.GoogleAPIs.COM", (HostPattern("fcm.googleapis.com", False, 443),)),
    ("fcm.googleapis.com.", (HostPattern("fcm.googleapis.com", False, 443),)),
    ("fcm.googleapis.com.:8443", (HostPattern("fcm.googleapis.com", False, 8443),)),
    ("fcm.googleapis.com:443", (HostPattern("fcm.googleapis.com", False, 443),)),
    ("*.Push.Apple.com.", (HostPattern("push.apple.com", True, 443),)),
    ("*.push.apple.com:65535", (HostPattern("push.apple.com", True, 65535),)),
    (" a.example.com , *.b.example.com:1 ", (HostPattern("a.example.com", False, 443),
                                           HostPattern("b.example.com", True, 1))),
    ("127.0.0.1:8443", (HostPattern("127.0.0.1", False, 8443),)),
    ("127.0.0.1", (HostPattern("127.0.0.1", False, 443),)),
    ("[::1]:8443", (HostPattern("::1", False, 8443),)),
    ("[0:0:0:0:0:0:0:1]", (HostPattern("::1", False, 443),)),
    ("bücher.example", (HostPattern("xn--bcher-kva.example", False, 443),)),
    ("*.xn--bcher-kva.example", (HostPattern("xn--bcher-kva.example", True, 443),)),
])
def test_allowed_hosts_are_normalised(value, expected):
    assert parse_allowed_hosts(value) == expected


@pytest.mark.parametrize("value, reason", [
    ("", "empty"),
    ("   ", "empty"),
    ("fcm.googleapis.com,", "empty item"),
    ("fcm.googleapis.com,,*.push.apple.com", "empty item"),
    (",fcm.googleapis.com", "empty item"),
    ("https://fcm.googleapis.com", "scheme"),
    ("fcm.googleapis.com/fcm/send", "path"),
    ("fcm.googleapis.com?x", "scheme or a path"),
    ("user@fcm.googleapis.com", "scheme or a path"),
    ("*", "every host"),
    ("*.", "no host"),
    ("*.:443", "no host"),
    ("a.*.com", "first label"),
    ("*.*.com", "first label"),
    ("*push.apple.com", "first label"),
    ("push.*", "first label"),
    ("*.com", "two labels"),
    ("*.127.0.0.1", "IP address"),
    ("*.[::1]", "IP address"),
    ("fcm.googleapis.com:0", "port"),
    ("fcm.googleapis.com:65536", "port"),
    ("fcm.googleapis.com:https", "port"),
    ("fcm.googleapis.com:", "port"),
    ("fcm.googleapis.com:-1", "port"),
    ("fcm.googleapis.com:4 43", "port"),
    ("fcm.googleapis.com:443:443", "':'"),
    ("::1", "brackets"),
    ("[::1", "']'"),
    ("127.1", "dotted-quad"),
    ("2130706433", "dotted-quad"),
    ("0x7f.1", "dotted-quad"),
    ("0177.0.0.1", "dotted-quad"),
    ("fcm%2egoogleapis.com", "percent"),
    ("fcm.googleapis.com..", "DNS name"),
    (".fcm.googleapis.com", "DNS name"),
    ("fcm googleapis.com", "DNS name"),
    ("ｆｃｍ.googleapis.com", "IDNA"),
])
def test_bad_allowed_hosts_are_refused_with_a_clear_message(value, reason):
    with pytest.raises(ValueError, match=reason):
        parse_allowed_hosts(value)


def test_bad_allowed_host_message_names_the_item():
    with pytest.raises(ValueError, match=r"allowed host 'a\.\*\.com'"):
        parse_allowed_hosts("fcm.googleapis.com,a.*.com")


def test_host_pattern_is_frozen():
    pattern = HostPattern("fcm.googleapis.com", False, 443)
    with pytest.raises(AttributeError):
        pattern.port = 80
