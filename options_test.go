package main

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

const testKey = "00112233445566778899aabbccddeeff"

// writeFile writes an options file with the given mode and returns its path.
func writeFile(t *testing.T, dir, name, content string, mode os.FileMode) string {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil { // umask must not decide
		t.Fatal(err)
	}
	return path
}

// parseConfig runs the command line (with system as /etc/cipe/options) up to the
// checked config, as run does before touching anything.
func parseConfig(t *testing.T, system string, args ...string) (*config, error) {
	t.Helper()
	c := &cli{systemOptions: system, origins: map[string]string{}}
	parser, err := newParser(c, &bytes.Buffer{}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	kargs, origins, err := rewriteArgs(args, optionNames(parser.Model))
	if err != nil {
		return nil, err
	}
	c.origins = origins
	if _, err := parser.Parse(kargs); err != nil {
		return nil, err
	}
	return c.config()
}

// runCLI runs the whole program as a user would and returns its status and output.
func runCLI(t *testing.T, system string, args ...string) (int, string, string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	stop := make(chan struct{})
	close(stop)
	code := runArgs(args, &stdout, &stderr, system, stop)
	return code, stdout.String(), stderr.String()
}

var baseArgs = []string{"peer=198.18.0.2:6000", "ipaddr=10.0.0.1", "ptpaddr=10.0.0.2"}

func TestPrecedence(t *testing.T) {
	dir := t.TempDir()
	system := writeFile(t, dir, "options", "key "+testKey+"\nmtu 1000\ntokxc 5\nmetric 3\ncttl 7\narg system\n", 0o600)
	ofile := writeFile(t, dir, "options.link", "mtu 1100\ntokxc 6\narg from -o file\n", 0o600)
	cfg, err := parseConfig(t, system, append([]string{"-o", ofile, "mtu=1200"}, baseArgs...)...)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name      string
		got, want any
	}{
		{"mtu: command line over -o over system", cfg.mtu, 1200},
		{"tokxc: -o over system", cfg.tokxc, 6 * time.Second},
		{"metric: system only", cfg.metric, 3},
		{"cttl: system only", cfg.cttl, 7},
		{"arg: -o file, words joined", cfg.arg, "from -o file"},
		{"tokey: default", cfg.tokey, 600 * time.Second},
		{"maxerr: default", cfg.maxerr, 8},
		{"key: from the system file", *cfg.key, [16]byte{0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff}},
	} {
		if c.got != c.want {
			t.Errorf("%s: got %v, want %v", c.name, c.got, c.want)
		}
	}

	// The same option in all three places, one place missing at a time.
	for _, c := range []struct {
		system, ofile, cmdline string
		want                   time.Duration
	}{
		{"tokey 10", "tokey 20", "tokey=30", 30 * time.Second},
		{"tokey 10", "tokey 20", "", 20 * time.Second},
		{"tokey 10", "", "tokey=30", 30 * time.Second},
		{"", "tokey 20", "tokey=30", 30 * time.Second},
		{"tokey 10", "", "", 10 * time.Second},
		{"", "", "", 600 * time.Second},
		{"", "", "--tokey=40", 40 * time.Second},
		{"", "", "tokey=2m", 2 * time.Minute},
	} {
		sys := writeFile(t, dir, "sys", "key "+testKey+"\n"+c.system+"\n", 0o600)
		of := writeFile(t, dir, "of", c.ofile+"\n", 0o600)
		args := append([]string{"-o", of}, baseArgs...)
		if c.cmdline != "" {
			args = append(args, c.cmdline)
		}
		cfg, err := parseConfig(t, sys, args...)
		if err != nil {
			t.Fatalf("%+v: %v", c, err)
		}
		if cfg.tokey != c.want {
			t.Errorf("%+v: tokey %v, want %v", c, cfg.tokey, c.want)
		}
	}
}

func TestOptionsFileSyntax(t *testing.T) {
	dir := t.TempDir()
	file := writeFile(t, dir, "o", `# a comment line

key `+testKey+`  -
	nokey no   # booleans take yes/no
debug
peer=198.18.0.9:6001
ipaddr   10.0.0.1
ptpaddr 0.0.0.0
me 198.18.0.1:domain
`, 0o600)
	cfg, err := parseConfig(t, "", "-o", file)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.key == nil || !cfg.debug || cfg.peer != netip.MustParseAddrPort("198.18.0.9:6001") {
		t.Errorf("md5sum key line, bare boolean or name=value not read: %+v", cfg)
	}
	if cfg.ptpaddr.IsValid() {
		t.Errorf("ptpaddr 0.0.0.0 must mean learn it, got %v", cfg.ptpaddr)
	}
	if cfg.me != netip.MustParseAddrPort("198.18.0.1:53") {
		t.Errorf("service name not resolved: %v", cfg.me)
	}
	if cfg.mtu != 1440 {
		t.Errorf("default mtu over IPv4 = %d, want 1440 (1500 - 28 - 32)", cfg.mtu)
	}
	// A byte-order mark, as some editors write one, is no part of the first option.
	bom := writeFile(t, dir, "bom", "\ufeffkey "+testKey+"\n", 0o600)
	if cfg, err := parseConfig(t, "", append([]string{"-o", bom}, baseArgs...)...); err != nil || cfg.key == nil {
		t.Errorf("a file starting with a byte-order mark: %v", err)
	}
}

func TestDefaultMTU(t *testing.T) {
	for _, c := range []struct {
		args []string
		want int
	}{
		{[]string{"peer=198.18.0.2:1", "ipaddr=10.0.0.1"}, 1440},
		{[]string{"peer=[2001:db8::2]:1", "ipaddr=10.0.0.1"}, 1420},
		{[]string{"peer=[::]:0", "ipaddr=fd00::1"}, 1420},
		{[]string{"peer=198.18.0.2:1", "ipaddr=10.0.0.1", "nokey", "key="}, 0}, // refused below
	} {
		dir := t.TempDir()
		file := writeFile(t, dir, "o", "key "+testKey+"\n", 0o600)
		cfg, err := parseConfig(t, "", append([]string{"-o", file}, c.args...)...)
		if c.want == 0 {
			if err == nil {
				t.Errorf("%v: accepted", c.args)
			}
			continue
		}
		if err != nil || cfg.mtu != c.want {
			t.Errorf("%v: mtu %v (%v), want %d", c.args, cfg, err, c.want)
		}
	}
	cfg, err := parseConfig(t, "", "peer=198.18.0.2:1", "ipaddr=10.0.0.1", "nokey")
	if err != nil || cfg.mtu != 1472 {
		t.Errorf("nokey mtu: %v %v, want 1472", cfg, err)
	}
	// Through a SOCKS proxy each datagram carries a 10-byte header to the relay.
	cfg, err = parseConfig(t, "", "peer=198.18.0.2:1", "ipaddr=10.0.0.1", "nokey", "socks=198.18.0.3:1080")
	if err != nil || cfg.mtu != 1462 || cfg.udpGSO || cfg.udpGRO {
		t.Errorf("nokey mtu through SOCKS: %+v %v, want 1462 and no GSO or GRO", cfg, err)
	}
}

// TestBadInput runs the program as a user would: each mistake gets one error line (and
// maybe a hint) and status 2, and nothing runs.
func TestBadInput(t *testing.T) {
	dir := t.TempDir()
	key := writeFile(t, dir, "key", "key "+testKey+"\n", 0o600)
	files := 0
	o := func(content string) string {
		files++
		return writeFile(t, dir, fmt.Sprintf("bad%d", files), content, 0o600)
	}
	ok := append([]string{"-o", key}, baseArgs...)
	for _, c := range []struct {
		name string
		args []string
		want string // in the error line
	}{
		{"unknown option", append(ok, "mtux=1"), `unknown option "mtux" (did you mean "mtu"?)`},
		{"unknown flag", append(ok, "--frobnicate"), `unknown flag "frobnicate"`},
		{"unknown option in a file", []string{"-o", o("key " + testKey + "\n\nfoo 1\n")}, `:3: unknown option "foo"`},
		{"bad value in a file", []string{"-o", o("mtu x1\n")}, `:1: mtu: "x1" is not a whole number`},
		{"two values in a file", []string{"-o", o("mtu 1 2\n")}, `:1: option "mtu" takes one value, got 2`},
		{"missing value in a file", []string{"-o", o("peer\n")}, `:1: option "peer" needs a value`},
		{"malformed address", append(ok, "peer=198.18.0.2"), `peer: "198.18.0.2" is not of the form ADDR:PORT`},
		{"IPv6 without brackets", append(ok, "peer=2001:db8::1:5"), "write an IPv6 address in brackets"},
		{"bad port", append(ok, "peer=198.18.0.2:nosuchservice"), `unknown port or service "nosuchservice"`},
		{"bad ipaddr", append(ok, "ipaddr=10.0.0.300"), `ipaddr: "10.0.0.300" is not an IP address`},
		{"malformed number", append(ok, "mtu=12o0"), `mtu: "12o0" is not a whole number`},
		{"malformed seconds", append(ok, "tokey=soon"), `tokey: "soon" is not a number of seconds`},
		{"malformed key", []string{"-o", o("key 0011\n"), "peer=198.18.0.2:1", "ipaddr=10.0.0.1"}, "key: must be 32 hex digits (got 4 characters)"},
		{"non-hex key", []string{"-o", o("key " + strings.Repeat("g", 32) + "\n"), "peer=198.18.0.2:1", "ipaddr=10.0.0.1"}, "found a character that is not one"},
		{"placeholder key", []string{"-o", o("key " + strings.Repeat("0", 32) + "\n"), "peer=198.18.0.2:1", "ipaddr=10.0.0.1"}, "the key is all zeros"},
		{"key on the command line", append(ok, "key="+testKey), "the key must not be given on the command line"},
		{"key as a flag", append(ok, "--key", testKey), "the key must not be given on the command line"},
		{"key and nokey", append(ok, "nokey"), "key (" + key + ":1) and nokey exclude each other"},
		{"neither key nor nokey", baseArgs, "no key given"},
		{"missing ipaddr", []string{"-o", key, "peer=198.18.0.2:1"}, "ipaddr is required"},
		{"missing peer", []string{"-o", key, "ipaddr=10.0.0.1"}, "peer is required"},
		{"mtu too small", append(ok, "mtu=100"), "mtu (command line): 100 is out of range (576 to 9000)"},
		{"mtu too large", append(ok, "mtu=65536"), "out of range (576 to 9000)"},
		{"IPv6 mtu", []string{"-o", key, "peer=198.18.0.2:1", "ipaddr=fd00::1", "mtu=1000"}, "IPv6 tunnel needs an MTU of at least 1280"},
		{"cttl", append(ok, "cttl=256"), "out of range (0 to 255)"},
		{"maxerr", append(ok, "maxerr=-2"), "out of range (-1 or more)"},
		{"mixed families", []string{"-o", key, "peer=198.18.0.2:1", "ipaddr=10.0.0.1", "ptpaddr=fd00::2"}, "not of the same IP version"},
		{"same addresses", []string{"-o", key, "peer=198.18.0.2:1", "ipaddr=10.0.0.1", "ptpaddr=10.0.0.1"}, "ipaddr and ptpaddr are both"},
		{"me and peer families", append(ok, "me=[::1]:5"), "are not of the same IP version"},
		{"peer port 0", append(ok, "peer=198.18.0.2:0"), "give both address and port"},
		{"device name", append(ok, "device=a/b"), `device (command line): "a/b" is not a valid interface name`},
		{"device too long", append(ok, "device=abcdefghijklmnop"), "longer than 15 characters"},
		{"missing script", append(ok, "ipup=/nonexistent/ip-up"), "ipup (command line): stat /nonexistent/ip-up"},
		{"script not executable", append(ok, "ipdown="+key), "is not an executable file"},
		{"toping without ping", append(ok, "toping=10"), "toping needs ping"},
		{"cipher", append(ok, "cipher=rot13"), `cipher: "rot13" is not one of auto, aes-gcm, chacha20-poly1305`},
		{"socks without a peer address", []string{"-o", key, "ipaddr=10.0.0.1", "peer=0.0.0.0:0", "socks=198.18.0.3:1080"}, "through a SOCKS proxy the peer's address must be given"},
		{"socks malformed", append(ok, "socks=proxy"), `socks: "proxy" is not of the form ADDR:PORT`},
		{"missing -o file", append([]string{"-o", filepath.Join(dir, "nope")}, baseArgs...), "no such file"},
		{"option without value", append(ok, "mtu"), `option "mtu" needs a value: mtu=N`},
		{"two -o files", append([]string{"-o", key}, ok...), `-o is given twice`},
		{"port out of range", append(ok, "peer=198.18.0.2:99999"), "port 99999 is out of range (0 to 65535)"},
		{"broadcast ipaddr", append(ok, "ipaddr=255.255.255.255"), "cannot be the tunnel address: it is the broadcast address"},
		{"loopback ipaddr", append(ok, "ipaddr=127.0.0.1"), "cannot be the tunnel address: it is a loopback address"},
		{"multicast ipaddr", append(ok, "ipaddr=224.0.0.1"), "it is a multicast address"},
		{"unspecified ipaddr", append(ok, "ipaddr=0.0.0.0"), "it is unspecified"},
		{"loopback ptpaddr", append(ok, "ptpaddr=127.0.0.2"), "cannot be the peer's tunnel address: it is a loopback address"},
		{"odd device name", append(ok, `device=cip"x`), "is not a valid interface name"},
	} {
		t.Run(c.name, func(t *testing.T) {
			code, stdout, stderr := runCLI(t, "", c.args...)
			if code != exitUsage {
				t.Errorf("status %d, want %d; stderr:\n%s", code, exitUsage, stderr)
			}
			first, _, _ := strings.Cut(stderr, "\n")
			if !strings.HasPrefix(first, "ciped: error: ") || !strings.Contains(first, c.want) {
				t.Errorf("error line %q, want it to contain %q", first, c.want)
			}
			if lines := strings.Count(stderr, "\n"); lines > 2 {
				t.Errorf("%d lines of output, want one error line and at most one hint:\n%s", lines, stderr)
			}
			if stdout != "" {
				t.Errorf("stdout: %q", stdout)
			}
			if strings.Contains(stderr, testKey) {
				t.Errorf("the key appears in the output:\n%s", stderr)
			}
			// ciped check says the same, with the same status, and creates nothing.
			code2, stdout2, stderr2 := runCLI(t, "", append([]string{"check"}, c.args...)...)
			if code2 != code || stderr2 != stderr || stdout2 != "" {
				t.Errorf("check: status %d, stdout %q, stderr\n%s\nwhere the start said (status %d)\n%s", code2, stdout2,
					stderr2, code, stderr)
			}
		})
	}
}

func TestOptionsFilePermissions(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct {
		content string
		mode    os.FileMode
		want    string // "" means accepted
		hint    string
	}{
		{"key " + testKey + "\n", 0o600, "", ""},
		{"key " + testKey + "\n", 0o400, "", ""},
		{"key " + testKey + "\n", 0o640, "holds the key but is readable by group or others (mode 0640)", "chmod 600"},
		{"key " + testKey + "\n", 0o604, "holds the key but is readable by group or others (mode 0604)", "chmod 600"},
		{"mtu 1400\n", 0o644, "", ""}, // no key: others may read it
		{"mtu 1400\n", 0o664, "is writable by group or others (mode 0664)", "chmod 600"},
		{"mtu 1400\n", 0o602, "is writable by group or others", "chmod 600"},
	} {
		path := writeFile(t, dir, "perm", c.content, c.mode)
		args := append([]string{"-o", path}, baseArgs...)
		if !strings.Contains(c.content, "key") {
			args = append(args, "nokey")
		}
		_, err := parseConfig(t, "", args...)
		if c.want == "" {
			if err != nil {
				t.Errorf("mode %04o: %v", c.mode, err)
			}
			continue
		}
		var ue *usageError
		errors.As(err, &ue)
		if err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), path) ||
			ue == nil || !strings.Contains(ue.hint, c.hint+" "+path) {
			t.Errorf("mode %04o: error %v (hint %+v), want %q naming the file and hint %q", c.mode, err, ue, c.want, c.hint)
		}
	}
	if os.Geteuid() == 0 {
		path := writeFile(t, dir, "owned", "key "+testKey+"\n", 0o600)
		if err := os.Chown(path, 65534, 65534); err != nil {
			t.Fatal(err)
		}
		_, err := parseConfig(t, "", append([]string{"-o", path}, baseArgs...)...)
		if err == nil || !strings.Contains(err.Error(), "is owned by uid 65534, not by root") {
			t.Errorf("file owned by nobody: %v", err)
		}
	}
	// A system options file that does not exist is fine; one that is unsafe is not.
	if _, err := parseConfig(t, filepath.Join(dir, "none"), append(baseArgs, "nokey")...); err != nil {
		t.Errorf("missing /etc/cipe/options: %v", err)
	}
	bad := writeFile(t, dir, "sysbad", "key "+testKey+"\n", 0o644)
	if _, err := parseConfig(t, bad, baseArgs...); err == nil {
		t.Error("a world-readable system options file with a key was accepted")
	}
}

func TestCLI(t *testing.T) {
	code, out, errOut := runCLI(t, "", "--version")
	if code != 0 || !strings.HasPrefix(out, "ciped 0.") {
		t.Errorf("--version: %d %q", code, out)
	}
	// The commit, when there is one, once: in the version or beside it.
	if m := regexp.MustCompile(`[0-9a-f]{12}`).FindString(out); m != "" && strings.Count(out, m[:7]) != 1 {
		t.Errorf("--version names the commit more than once: %q", out)
	}
	// ciped alone, with nothing to run: a short usage, not the first missing option.
	code, out, errOut = runCLI(t, "")
	if code != exitUsage || out != "" || !strings.HasPrefix(errOut, "usage: ciped [-o FILE]") || !strings.Contains(errOut, "ciped check") {
		t.Errorf("ciped alone: %d %q\n%s", code, out, errOut)
	}
	code, out, _ = runCLI(t, "", "--help")
	if code != 0 || !strings.Contains(out, "--tokxc=SECONDS") || !strings.Contains(out, "genkey") {
		t.Errorf("--help: %d\n%s", code, out)
	}
	code, out, errOut = runCLI(t, "", "genkey")
	fields := strings.Fields(out)
	if code != 0 || len(fields) != 2 || fields[0] != "key" || len(fields[1]) != 32 || errOut != "" {
		t.Fatalf("genkey: %d %q %q", code, out, errOut)
	}
	// What genkey prints is a valid options file line.
	dir := t.TempDir()
	file := writeFile(t, dir, "k", out, 0o600)
	if _, err := parseConfig(t, "", append([]string{"-o", file}, baseArgs...)...); err != nil {
		t.Errorf("genkey's line: %v", err)
	}
	_, out2, _ := runCLI(t, "", "genkey")
	if out2 == out {
		t.Error("genkey printed the same key twice")
	}
}

// TestScriptPathsAbsolute: scripts run with / as working directory, so a relative path
// is made absolute when the options are read.
func TestScriptPathsAbsolute(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, dir, "up", "#!/bin/sh\n", 0o755)
	t.Chdir(dir)
	cfg, err := parseConfig(t, "", append(baseArgs, "nokey", "ipup=up")...)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.ipup != filepath.Join(dir, "up") {
		t.Errorf("ipup=up became %q, want %q", cfg.ipup, filepath.Join(dir, "up"))
	}
}

func TestHostnamesResolve(t *testing.T) {
	cfg, err := parseConfig(t, "", "peer=localhost:6000", "ipaddr=10.0.0.1", "nokey", "me=127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.peer != netip.MustParseAddrPort("127.0.0.1:6000") {
		t.Errorf("localhost resolved to %v", cfg.peer)
	}
	if _, err := parseConfig(t, "", "peer=no-such-host.invalid:6000", "ipaddr=10.0.0.1", "nokey"); err == nil ||
		!strings.Contains(err.Error(), `cannot resolve "no-such-host.invalid"`) {
		t.Errorf("unresolvable name: %v", err)
	}
}

// FuzzOptionsFile: whatever a file holds, the parser neither panics nor accepts what
// it cannot read back; accepted files survive a round trip through their canonical form.
func FuzzOptionsFile(f *testing.F) {
	f.Add("key " + testKey + "  -\nnokey\n# comment\npeer=1.2.3.4:5\n")
	f.Add("mtu 1400\narg a b c\n\n   debug yes\n")
	f.Add("ipaddr\t10.0.0.1 # x\n=x\n")
	c := &cli{origins: map[string]string{}}
	parser, err := newParser(c, &bytes.Buffer{}, &bytes.Buffer{})
	if err != nil {
		f.Fatal(err)
	}
	names := optionNames(parser.Model)
	f.Fuzz(func(t *testing.T, content string) {
		opts, err := parseOptionsFile("f", strings.NewReader(content))
		if err != nil {
			if _, ok := err.(*usageError); !ok {
				t.Fatalf("error of type %T", err)
			}
			return
		}
		var canon strings.Builder
		for _, o := range opts {
			if strings.ContainsAny(o.name, " \t\n#=") || strings.ContainsAny(o.value, "\n#") {
				t.Fatalf("parsed %+v", o)
			}
			canon.WriteString(o.name + " " + o.value + "\n")
		}
		again, err := parseOptionsFile("f", strings.NewReader(canon.String()))
		if err != nil || len(again) != len(opts) {
			t.Fatalf("canonical form %q: %v", canon.String(), err)
		}
		for i := range opts {
			if again[i].name != opts[i].name || again[i].value != opts[i].value {
				t.Fatalf("round trip: %+v became %+v", opts[i], again[i])
			}
		}
		_, _ = checkOptions("f", opts, names) // must not panic
	})
}

// TestSyslogWriter: with the syslog option each log line is one syslog message, facility
// daemon, tag ciped.
func TestSyslogWriter(t *testing.T) {
	path := filepath.Join(t.TempDir(), "log")
	ln, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	w, err := newSyslogWriter("unixgram", path)
	if err != nil {
		t.Fatal(err)
	}
	newLogger(w, "cipcb3", false).Printf("link up: peer %s", "198.18.0.2:6000")
	ln.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 1024)
	n, err := ln.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	// <30> is daemon (3) * 8 + info (6).
	if msg := string(buf[:n]); !strings.HasPrefix(msg, "<30>") || !strings.Contains(msg, " ciped[") ||
		!strings.HasSuffix(strings.TrimSpace(msg), "cipcb3: link up: peer 198.18.0.2:6000") {
		t.Fatalf("syslog message %q", msg)
	}
	if _, err := newSyslogWriter("unixgram", filepath.Join(t.TempDir(), "none")); err == nil {
		t.Fatal("a syslog socket nobody listens on was accepted")
	}
}

// TestScriptChecks: scripts run as root, so they are checked like an options file: the
// owner, no write access for group or others, on the file and every directory above it
// (a root-owned sticky one like /tmp excepted); a default script in the configuration
// directory is checked at start like a named one, and none switches it off.
func TestScriptChecks(t *testing.T) {
	etc := t.TempDir()
	system := writeFile(t, etc, "options", "", 0o600)
	args := append(baseArgs, "nokey")

	// No default scripts: nothing to run.
	cfg, err := parseConfig(t, system, args...)
	if err != nil || cfg.ipup != "" || cfg.ipdown != "" {
		t.Fatalf("without default scripts: %v, ipup %q ipdown %q", err, cfg.ipup, cfg.ipdown)
	}
	// Default scripts are taken from the configuration directory.
	up := writeFile(t, etc, "ip-up", "#!/bin/sh\n", 0o755)
	down := writeFile(t, etc, "ip-down", "#!/bin/sh\n", 0o700)
	if cfg, err = parseConfig(t, system, args...); err != nil || cfg.ipup != up || cfg.ipdown != down {
		t.Fatalf("default scripts: %v, ipup %q ipdown %q", err, cfg.ipup, cfg.ipdown)
	}
	// A default script that cannot run is an error at start, with a way out.
	os.Chmod(up, 0o644)
	_, err = parseConfig(t, system, args...)
	var ue *usageError
	if !errors.As(err, &ue) || !strings.Contains(err.Error(), `"`+up+`" is not an executable file`) ||
		!strings.Contains(ue.hint, "ipup=none") {
		t.Fatalf("a default ip-up that is not executable: %v (hint %+v)", err, ue)
	}
	// none runs no script, not even the default.
	if cfg, err = parseConfig(t, system, append(args, "ipup=none")...); err != nil || cfg.ipup != "" || cfg.ipdown != down {
		t.Fatalf("ipup=none: %v, ipup %q ipdown %q", err, cfg.ipup, cfg.ipdown)
	}
	os.Chmod(up, 0o755)

	for _, c := range []struct {
		name  string
		setup func(dir string) string // makes the script, returns its path
		want  string
	}{
		{"group-writable script", func(dir string) string { return writeFile(t, dir, "s", "#!/bin/sh\n", 0o775) },
			"is writable by group or others (mode 0775)"},
		{"world-writable script", func(dir string) string { return writeFile(t, dir, "s", "#!/bin/sh\n", 0o777) },
			"is writable by group or others (mode 0777)"},
		{"group-writable directory", func(dir string) string {
			sub := filepath.Join(dir, "scripts")
			os.Mkdir(sub, 0o770)
			os.Chmod(sub, 0o770)
			return writeFile(t, sub, "s", "#!/bin/sh\n", 0o755)
		}, "is writable by group or others (mode 0770), who could replace it"},
		{"link into a world-writable directory", func(dir string) string {
			sub := filepath.Join(dir, "open")
			os.Mkdir(sub, 0o777)
			os.Chmod(sub, 0o777)
			target := writeFile(t, sub, "s", "#!/bin/sh\n", 0o755)
			link := filepath.Join(dir, "link")
			os.Symlink(target, link)
			return link
		}, "writable by group or others (mode 0777)"},
	} {
		t.Run(c.name, func(t *testing.T) {
			path := c.setup(t.TempDir())
			_, err := parseConfig(t, "", append(args, "ipdown="+path)...)
			if err == nil || !strings.Contains(err.Error(), c.want) || !strings.HasPrefix(err.Error(), "ipdown (command line): script") {
				t.Fatalf("error %v, want one naming ipdown and %q", err, c.want)
			}
		})
	}
	if os.Geteuid() == 0 {
		// A script owned by another user would run as root: refused.
		path := writeFile(t, t.TempDir(), "s", "#!/bin/sh\n", 0o755)
		os.Chown(path, 65534, 65534)
		if _, err := parseConfig(t, "", append(args, "ipup="+path)...); err == nil ||
			!strings.Contains(err.Error(), "is owned by uid 65534, not by root") {
			t.Fatalf("a script owned by nobody: %v", err)
		}
	}
	// In a root-owned sticky directory (as t.TempDir's /tmp is) a script of ours is fine.
	if _, err := parseConfig(t, "", append(args, "ipup="+up)...); err != nil {
		t.Fatal(err)
	}
}

// TestHardenProcess: ciped makes itself non-dumpable (no core dump with the key in it, no
// debugger or /proc/PID/mem of the same user).
func TestHardenProcess(t *testing.T) {
	was, err := unix.PrctlRetInt(unix.PR_GET_DUMPABLE, 0, 0, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Prctl(unix.PR_SET_DUMPABLE, uintptr(was), 0, 0, 0)
	hardenProcess()
	if now, err := unix.PrctlRetInt(unix.PR_GET_DUMPABLE, 0, 0, 0, 0); err != nil || now != 0 {
		t.Fatalf("dumpable is %d (%v) after hardenProcess, want 0", now, err)
	}
}

// TestCheck: ciped check passes good options (status 0, one line saying what they set
// up) and creates nothing; as TestBadInput shows, it refuses bad ones as start-up does.
func TestCheck(t *testing.T) {
	dir := t.TempDir()
	key := writeFile(t, dir, "key", "key "+testKey+"\noldkey "+strings.Repeat("ab", 16)+"\n", 0o600)
	code, stdout, stderr := runCLI(t, "", append([]string{"check", "-o", key, "device=cpchk%d"}, baseArgs...)...)
	if code != exitOK || stderr != "" || !strings.Contains(stdout, "options are valid: device cpchk%d, tunnel 10.0.0.1 peer 10.0.0.2") ||
		!strings.Contains(stdout, "key and oldkey") || strings.Contains(stdout, testKey) {
		t.Fatalf("check: status %d\nstdout %q\nstderr %q", code, stdout, stderr)
	}
	if ifs, _ := net.Interfaces(); slices.ContainsFunc(ifs, func(i net.Interface) bool { return strings.HasPrefix(i.Name, "cpchk") }) {
		t.Fatal("check created an interface")
	}
}

// TestKeyOptions: oldkey goes with key, only in a file; a second key line is an error
// that points to oldkey.
func TestKeyOptions(t *testing.T) {
	dir := t.TempDir()
	other := strings.Repeat("ab", 16)
	for _, c := range []struct{ file, want, hint string }{
		{"key " + testKey + "\nkey " + other + "\n", `:2: option "key" is given a second time (first on line 1)`, "oldkey"},
		{"oldkey " + other + "\nnokey\n", "an oldkey needs a key", ""},
		{"key " + testKey + "\noldkey " + testKey + "\n", "the old key is the key itself", "remove the oldkey line"},
		{"key " + testKey + "\noldkey " + strings.Repeat("0", 32) + "\n", "the old key is all zeros", ""},
		{"mtu 1400\nmtu 1400\n", `:2: option "mtu" is given a second time`, ""},
	} {
		path := writeFile(t, dir, "k", c.file, 0o600)
		_, err := parseConfig(t, "", append([]string{"-o", path}, baseArgs...)...)
		var ue *usageError
		if !errors.As(err, &ue) || !strings.Contains(err.Error(), c.want) || !strings.Contains(ue.hint, c.hint) {
			t.Errorf("%q: %v (hint %+v), want %q", c.file, err, ue, c.want)
		}
	}
	if _, err := parseConfig(t, "", append(baseArgs, "oldkey="+other)...); err == nil ||
		!strings.Contains(err.Error(), "the oldkey must not be given on the command line") {
		t.Errorf("oldkey on the command line: %v", err)
	}
	path := writeFile(t, dir, "ok", "key "+testKey+"\noldkey "+other+"\n", 0o600)
	if cfg, err := parseConfig(t, "", append([]string{"-o", path}, baseArgs...)...); err != nil || cfg.oldkey == nil ||
		hex.EncodeToString(cfg.oldkey[:]) != other {
		t.Errorf("key and oldkey: %v", err)
	}
}
