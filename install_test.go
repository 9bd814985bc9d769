package main

// Installation and what ships with ciped: install.sh, the systemd unit, the manual, the
// samples.

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// needTool skips a test without the tool, or fails it in CI, where it must run.
func needTool(t *testing.T, tool, pkg string) {
	t.Helper()
	if _, err := exec.LookPath(tool); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("needs %s (Debian package %s), and in CI this test must run", tool, pkg)
		}
		t.Skipf("needs %s (Debian package %s); skipped", tool, pkg)
	}
}

// TestInstall runs install.sh into a staging tree: everything lands with its mode, and a
// second run keeps a script the admin changed.
func TestInstall(t *testing.T) {
	needTool(t, "install", "coreutils")
	stage := t.TempDir()
	install := func() string {
		cmd := exec.Command("./install.sh")
		cmd.Env = append(os.Environ(), "DESTDIR="+stage)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("install.sh: %v\n%s", err, out)
		}
		return string(out)
	}
	install()
	want := map[string]os.FileMode{
		"usr/local/sbin/ciped": 0o755, "etc/cipe/ip-up": 0o755, "etc/cipe/ip-down": 0o755,
		"usr/local/lib/systemd/system/ciped@.service": 0o644, "usr/local/share/man/man8/ciped.8": 0o644,
		"etc/cipe/samples/options.office": 0o600, "etc/cipe/samples/ip-up.routes": 0o755,
	}
	for path, mode := range want {
		info, err := os.Stat(filepath.Join(stage, path))
		if err != nil || info.Mode().Perm() != mode {
			t.Errorf("%s: %v, %v (want mode %04o)", path, info, err, mode)
		}
	}
	if _, err := os.Stat(filepath.Join(stage, "etc/cipe/options")); err == nil {
		t.Error("install.sh made an options file")
	}
	out, err := exec.Command(filepath.Join(stage, "usr/local/sbin/ciped"), "--version").CombinedOutput()
	if err != nil || !strings.HasPrefix(string(out), "ciped ") {
		t.Errorf("installed ciped --version: %v %s", err, out)
	}
	changed := filepath.Join(stage, "etc/cipe/ip-up")
	if err := os.WriteFile(changed, []byte("#!/bin/sh\n# the admin's own\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if out := install(); !strings.Contains(out, "kept      /etc/cipe/ip-up") {
		t.Errorf("second run did not say it kept ip-up:\n%s", out)
	}
	if b, _ := os.ReadFile(changed); !bytes.Contains(b, []byte("the admin's own")) {
		t.Error("a second install overwrote the admin's ip-up")
	}
}

// TestGoInstall: `go install` of the module installs a working ciped.
func TestGoInstall(t *testing.T) {
	gobin := t.TempDir()
	cmd := exec.Command("go", "install", ".")
	cmd.Env = append(os.Environ(), "GOBIN="+gobin)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go install: %v\n%s", err, out)
	}
	if out, err := exec.Command(filepath.Join(gobin, "ciped"), "--version").CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
}

// TestSystemdUnit checks ciped@.service with systemd-analyze verify (Debian's systemd),
// pointed at a ciped that exists.
func TestSystemdUnit(t *testing.T) {
	needTool(t, "systemd-analyze", "systemd")
	unit, err := os.ReadFile("ciped@.service")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Type=notify", "ExecStart=/usr/local/sbin/ciped -o /etc/cipe/options.%i",
		"Restart=on-failure", "DeviceAllow=/dev/net/tun rw", "CAP_NET_ADMIN", "KillMode=mixed", "LimitCORE=0"} {
		if !bytes.Contains(unit, []byte(want)) {
			t.Errorf("the unit lacks %q", want)
		}
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "ciped@link1.service")
	unit = bytes.ReplaceAll(unit, []byte("/usr/local/sbin/ciped"), []byte(cipedBinary(t)))
	if err := os.WriteFile(path, unit, 0o644); err != nil {
		t.Fatal(err)
	}
	// --man=no: the manual is checked by TestManual; it is not installed here.
	if out, err := exec.Command("systemd-analyze", "verify", "--man=no", path).CombinedOutput(); err != nil || len(out) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
	for _, want := range []string{"ExecReload=/bin/kill -HUP $MAINPID", "RestartPreventExitStatus=2", "LimitCORE=0"} {
		if !bytes.Contains(unit, []byte(want)) {
			t.Errorf("the unit lacks %q", want)
		}
	}
	// The metrics sample: a timer and its service.
	for _, name := range []string{"ciped-metrics.service", "ciped-metrics.timer"} {
		b, err := os.ReadFile(filepath.Join("samples", name))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := exec.Command("systemd-analyze", "verify", "--man=no", filepath.Join(dir, "ciped-metrics.timer"),
		filepath.Join(dir, "ciped-metrics.service")).CombinedOutput(); err != nil || len(out) > 0 {
		t.Fatalf("systemd-analyze verify of the metrics sample: %v\n%s", err, out)
	}
}

// TestManual: ciped.8 formats without a warning, and it and README's options table name
// every option ciped has, and no other.
func TestManual(t *testing.T) {
	needTool(t, "groff", "groff-base")
	out, err := exec.Command("groff", "-man", "-Tutf8", "-ww", "-z", "ciped.8").CombinedOutput()
	if err != nil || len(out) > 0 {
		t.Fatalf("groff: %v\n%s", err, out)
	}
	c := &cli{}
	parser, err := newParser(c, &bytes.Buffer{}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	man, _ := os.ReadFile("ciped.8")
	readme, _ := os.ReadFile("README")
	options := man[bytes.Index(man, []byte("\n.SH OPTIONS\n"))+1:]
	options = options[:bytes.Index(options, []byte("\n.SH "))]
	manNames := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?m)^\.TP\n\.BI? (\w+)`).FindAllSubmatch(options, -1) {
		manNames[string(m[1])] = true
	}
	table := readme[bytes.Index(readme, []byte("| option | value |")):]
	table = table[:bytes.Index(table, []byte("\n\n"))]
	readmeNames := map[string]bool{}
	for _, m := range regexp.MustCompile("(?m)^\\| `(\\w+)` \\|").FindAllSubmatch(table, -1) {
		readmeNames[string(m[1])] = true
	}
	for name := range optionNames(parser.Model) {
		if !manNames[name] {
			t.Errorf("option %q is not in ciped.8", name)
		}
		if !readmeNames[name] {
			t.Errorf("option %q is not in README's table", name)
		}
		delete(manNames, name)
		delete(readmeNames, name)
	}
	for _, extra := range []map[string]bool{readmeNames} {
		for name := range extra {
			t.Errorf("README documents %q, which is not an option", name)
		}
	}
	for name := range manNames {
		t.Errorf("ciped.8 documents %q among the options, which is not one", name)
	}
}

// TestSampleOptions: every sample options file is made of options ciped knows, with
// values it takes (the placeholder key and the host names aside).
func TestSampleOptions(t *testing.T) {
	c := &cli{}
	parser, err := newParser(c, &bytes.Buffer{}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	names := optionNames(parser.Model)
	files, _ := filepath.Glob("samples/options.*")
	if len(files) < 4 {
		t.Fatalf("only %d sample options files", len(files))
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		opts, err := parseOptionsFile(f, bytes.NewReader(b))
		if err == nil {
			_, err = checkOptions(f, opts, names)
		}
		if err != nil {
			t.Errorf("%s: %v", f, err)
		}
		if bytes.Contains(b, []byte("\nkey ")) || !bytes.Contains(b, []byte("ciped genkey >> /etc/cipe/options.")) {
			t.Errorf("%s: holds a key line, or does not say how to add one", f)
		}
	}
}

// TestE2ESampleScripts runs the route and firewall samples as ip-up and ip-down would, in
// a namespace of their own with a point-to-point interface: what ip-up adds, ip-down
// removes.
func TestE2ESampleScripts(t *testing.T) {
	requireRoot(t)
	needTool(t, "nft", "nftables")
	needTool(t, "unshare", "util-linux")
	ns := newNetnsPair(t, false).a
	mustRun(t, "ip", "-n", ns, "tuntap", "add", "mode", "tun", "dev", "cipcb7")
	mustRun(t, "ip", "-n", ns, "addr", "add", "10.77.0.1", "peer", "10.77.0.2", "dev", "cipcb7")
	mustRun(t, "ip", "-n", ns, "link", "set", "cipcb7", "up")
	dir, _ := os.Getwd()
	runArgs := func(script, ifname, arg string) ([]byte, error) {
		// A private /var/log: the samples append to /var/log/ciped.log.
		cmd := exec.Command("ip", "netns", "exec", ns, "unshare", "-m", "--propagation", "private", "sh", "-c",
			`mount -t tmpfs none /var/log && exec "$0" "$@"`, filepath.Join(dir, "samples", script),
			ifname, "198.18.0.1:6789", "4242", "10.77.0.1", "10.77.0.2", arg)
		cmd.Env = append(os.Environ(), "CIPED_REASON=test", "CIPED_NETNS=1")
		return cmd.CombinedOutput()
	}
	run := func(script string) {
		t.Helper()
		if out, err := runArgs(script, "cipcb7", "192.168.2.0/24,192.168.3.0/24"); err != nil {
			t.Fatalf("%s: %v\n%s", script, err, out)
		}
	}
	run("ip-up.routes")
	routes := mustRun(t, "ip", "-n", ns, "route")
	for _, want := range []string{"192.168.2.0/24 via 10.77.0.2 dev cipcb7", "192.168.3.0/24 via 10.77.0.2 dev cipcb7"} {
		if !strings.Contains(routes, want) {
			t.Errorf("after ip-up.routes, no %q in:\n%s", want, routes)
		}
	}
	run("ip-down.routes")
	if routes := mustRun(t, "ip", "-n", ns, "route"); strings.Contains(routes, "192.168.") {
		t.Errorf("after ip-down.routes:\n%s", routes)
	}
	run("ip-up.firewall")
	run("ip-up.firewall") // twice: the same rules, not twice as many
	rules := mustRun(t, "ip", "netns", "exec", ns, "nft", "list", "table", "inet", "ciped_cipcb7")
	if !strings.Contains(rules, `iifname "cipcb7" drop`) || strings.Count(rules, "tcp dport 22 accept") != 1 {
		t.Errorf("after ip-up.firewall:\n%s", rules)
	}
	run("ip-down.firewall")
	if out, err := exec.Command("ip", "netns", "exec", ns, "nft", "list", "table", "inet", "ciped_cipcb7").CombinedOutput(); err == nil {
		t.Errorf("after ip-down.firewall the table is still there:\n%s", out)
	}
	// What is not a network, or not an interface name, is refused, not spliced into nft
	// or expanded as file names.
	for _, c := range []struct{ script, ifname, arg string }{
		{"ip-up.firewall", "cipcb7", "1.2.3.4 } ; flush ruleset ; add table inet evil {"},
		{"ip-up.firewall", `cipcb7" drop ; flush ruleset ; #`, "192.168.2.0/24"},
		{"ip-up.routes", "cipcb7", "*"},
	} {
		if out, err := runArgs(c.script, c.ifname, c.arg); err == nil {
			t.Errorf("%s with %q %q: accepted\n%s", c.script, c.ifname, c.arg, out)
		}
	}
	if out, _ := exec.Command("ip", "netns", "exec", ns, "nft", "list", "tables").CombinedOutput(); len(out) != 0 {
		t.Errorf("odd arguments left nft tables:\n%s", out)
	}
}

// TestInstalledSamples: after install.sh, each sample options file, installed as its
// comments say (install -m 600, then ciped genkey >> it), passes ciped check: every path
// it names is where install.sh put it. (In a private mount namespace whose /etc is an
// overlay holding the staged /etc/cipe and the samples' host names.)
func TestInstalledSamples(t *testing.T) {
	requireRoot(t)
	needTool(t, "unshare", "util-linux")
	stage := t.TempDir()
	cmd := exec.Command("./install.sh")
	cmd.Env = append(os.Environ(), "DESTDIR="+stage)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("install.sh: %v\n%s", err, out)
	}
	samples := sampleInstalls(t)
	script := []string{
		"set -e",
		"mkdir -p " + stage + "/upper " + stage + "/work",
		"mount -t overlay overlay -o lowerdir=/etc,upperdir=" + stage + "/upper,workdir=" + stage + "/work /etc",
		"mkdir -p /etc/cipe", "mount --bind " + stage + "/etc/cipe /etc/cipe",
		"echo '203.0.113.9 hub.example.net proxy.example.net' >> /etc/hosts",
		"cd /etc/cipe/samples", "PATH=" + stage + "/usr/local/sbin:$PATH",
	}
	for _, sample := range samples {
		script = append(script, sample.commands, "echo checking "+sample.installed, "ciped check -o "+sample.installed)
	}
	out, err := exec.Command("unshare", "-m", "--propagation", "private", "sh", "-c", strings.Join(script, "\n")).CombinedOutput()
	if err != nil || strings.Count(string(out), "options are valid") != len(samples) {
		t.Fatalf("installing and checking the samples: %v\n%s", err, out)
	}
}

// sampleInstall is how a sample options file says to put it in place: the commands
// (run in the directory the samples are in) and the file they make.
type sampleInstall struct {
	sample, commands, installed string
}

// sampleInstalls reads, from each samples/options.* file, the install and genkey lines
// its comments give; a sample that does not say how to install it fails the test.
func sampleInstalls(t *testing.T) []sampleInstall {
	t.Helper()
	files, _ := filepath.Glob("samples/options.*")
	how := regexp.MustCompile(`(?m)^#\s+(install -m 600 options\.\S+ (/etc/cipe/options\.\S+))\n#\s+(ciped genkey >> /etc/cipe/options\.\S+)$`)
	var all []sampleInstall
	for _, f := range files {
		b, _ := os.ReadFile(f)
		m := how.FindSubmatch(b)
		if m == nil {
			t.Fatalf("%s does not say how to install it", f)
		}
		all = append(all, sampleInstall{f, string(m[1]) + " && " + string(m[3]), string(m[2])})
	}
	if len(all) == 0 {
		t.Fatal("no samples/options.* files")
	}
	return all
}
