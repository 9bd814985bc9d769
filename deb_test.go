package main

// The Debian package: packaging/build-deb.sh builds it, lintian passes it, and apt
// installs, removes and purges it in a throwaway copy of this machine (overlays on /etc,
// /usr and /var in a private mount namespace: the real system is never touched).

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// buildDeb runs packaging/build-deb.sh into dir and returns the package's path.
func buildDeb(t *testing.T, dir string) string {
	t.Helper()
	out, err := exec.Command("packaging/build-deb.sh", dir).Output()
	if err != nil {
		var stderr []byte
		if e, ok := err.(*exec.ExitError); ok {
			stderr = e.Stderr
		}
		t.Fatalf("packaging/build-deb.sh: %v\n%s%s", err, out, stderr)
	}
	deb := strings.TrimSpace(string(out))
	if filepath.Dir(deb) != dir || !strings.HasSuffix(deb, ".deb") {
		t.Fatalf("build-deb.sh printed %q, want a .deb in %s", deb, dir)
	}
	return deb
}

// TestDebianPackage builds the package twice (the same bytes), lints it, and checks it
// the way an admin meets it: `apt install ./ciped_*.deb` on a machine with no
// /etc/cipe, the files and their modes, conffiles, the version, the installed unit
// (systemd-analyze verify), every sample copied as its comments say and checked by the
// installed ciped, then `apt remove` (the admin's changed ip-up and options file stay)
// and `apt purge` (the package's conffiles go, the admin's options file stays).
func TestDebianPackage(t *testing.T) {
	requireRoot(t)
	for _, tool := range [][2]string{{"dpkg-deb", "dpkg"}, {"dpkg-shlibdeps", "dpkg-dev"}, {"gcc", "gcc"},
		{"strip", "binutils"}, {"lintian", "lintian"}, {"apt", "apt"}, {"unshare", "util-linux"},
		{"nsenter", "util-linux"}, {"systemd-analyze", "systemd"}} {
		needTool(t, tool[0], tool[1])
	}
	dir := t.TempDir()
	deb := buildDeb(t, filepath.Join(dir, "a"))
	again := buildDeb(t, filepath.Join(dir, "b"))
	a, _ := os.ReadFile(deb)
	b, _ := os.ReadFile(again)
	if len(a) == 0 || !bytes.Equal(a, b) {
		t.Errorf("two builds of one tree differ (%d and %d bytes): the build is not reproducible", len(a), len(b))
	}
	debVersion := strings.Split(filepath.Base(deb), "_")[1]

	// lintian: no tag but the overridden ones (each with its reason in the overrides file).
	lint := exec.Command("lintian", "-EvIL", "+pedantic", "--show-overrides", deb)
	lint.Stderr = io.Discard // as root it warns that it runs as root
	out, err := lint.Output()
	if err != nil {
		t.Errorf("lintian: %v\n%s", err, out)
	}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if line != "" && !strings.HasPrefix(line, "O: ") && !strings.HasPrefix(line, "N: ") {
			t.Errorf("lintian: %s", line)
		}
	}

	// Every Go module linked into the binary is named in the copyright file.
	x := filepath.Join(dir, "x")
	if out, err := exec.Command("dpkg-deb", "-x", deb, x).CombinedOutput(); err != nil {
		t.Fatalf("dpkg-deb -x: %v\n%s", err, out)
	}
	mods, err := exec.Command("go", "version", "-m", filepath.Join(x, "usr/sbin/ciped")).Output()
	if err != nil {
		t.Fatalf("go version -m: %v", err)
	}
	copyright, _ := os.ReadFile(filepath.Join(x, "usr/share/doc/ciped/copyright"))
	deps := regexp.MustCompile(`(?m)^\s+dep\s+(\S+)`).FindAllSubmatch(mods, -1)
	if len(deps) == 0 {
		t.Errorf("go version -m names no module:\n%s", mods)
	}
	for _, d := range deps {
		if !bytes.Contains(copyright, d[1]) {
			t.Errorf("module %s is in the binary but not in the copyright file", d[1])
		}
	}

	root := throwawayRoot(t)
	in := func(script string) string {
		t.Helper()
		cmd := exec.Command("nsenter", "-t", fmt.Sprint(root.pid), "-m", "--", "sh", "-ec", script)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s: %v\n%s", script, err, out)
		}
		return string(out)
	}
	at := func(path string) string { return filepath.Join(root.view, path) }
	exists := func(path string) bool { _, err := os.Lstat(at(path)); return err == nil }

	in("rm -rf /etc/cipe")
	in("cd " + filepath.Dir(deb) + " && apt install -y ./" + filepath.Base(deb))
	want := map[string]os.FileMode{
		"usr/sbin/ciped": 0o755, "lib/systemd/system/ciped@.service": 0o644,
		"usr/share/man/man8/ciped.8.gz": 0o644,
		"etc/cipe/ip-up":                0o755, "etc/cipe/ip-down": 0o755,
		"etc/cipe/ip-up.routes": 0o755, "etc/cipe/ip-down.routes": 0o755,
		"etc/cipe/ip-up.firewall": 0o755, "etc/cipe/ip-down.firewall": 0o755,
		"usr/share/doc/ciped/PROTOCOL.md": 0o644, "usr/share/doc/ciped/README": 0o644,
		"usr/share/doc/ciped/copyright": 0o644, "usr/share/doc/ciped/changelog.Debian.gz": 0o644,
		"usr/share/doc/ciped/samples/options.office": 0o644,
		"usr/share/doc/ciped/samples/ip-up.routes":   0o644,
	}
	for path, mode := range want {
		info, err := os.Stat(at(path))
		if err != nil {
			t.Errorf("not installed: /%s (%v)", path, err)
			continue
		}
		st := info.Sys().(*syscall.Stat_t)
		if info.Mode().Perm() != mode || st.Uid != 0 || st.Gid != 0 {
			t.Errorf("/%s: mode %04o, owner %d:%d; want %04o, root:root", path, info.Mode().Perm(), st.Uid, st.Gid, mode)
		}
	}
	if matches, _ := filepath.Glob(at("etc/cipe/options*")); len(matches) != 0 {
		t.Errorf("the package made an options file: %v", matches)
	}
	conffiles := in("dpkg-query -W -f='${Conffiles}' ciped")
	for _, f := range []string{"ip-up", "ip-down", "ip-up.routes", "ip-down.routes", "ip-up.firewall", "ip-down.firewall"} {
		if !regexp.MustCompile(`(?m)^ /etc/cipe/` + regexp.QuoteMeta(f) + ` [0-9a-f]{32}$`).MatchString(conffiles) {
			t.Errorf("/etc/cipe/%s is not a conffile:\n%s", f, conffiles)
		}
	}
	if v := in("ciped --version"); !regexp.MustCompile(`^ciped ` + regexp.QuoteMeta(debVersion) + ` \(go[0-9.]+\)\n$`).MatchString(v) {
		t.Errorf("ciped --version: %q, want the package's version %s once", v, debVersion)
	}
	unit, _ := os.ReadFile(at("lib/systemd/system/ciped@.service"))
	if !bytes.Contains(unit, []byte("ExecStart=/usr/sbin/ciped -o /etc/cipe/options.%i\n")) {
		t.Errorf("the installed unit does not run /usr/sbin/ciped:\n%s", unit)
	}
	if out := in("systemd-analyze verify --man=no ciped@office-b.service 2>&1"); strings.TrimSpace(out) != "" {
		t.Errorf("systemd-analyze verify ciped@office-b.service:\n%s", out)
	}
	if out := in("man -w ciped 2>/dev/null || echo none"); command("man") && strings.TrimSpace(out) != "/usr/share/man/man8/ciped.8.gz" {
		t.Errorf("man -w ciped: %q", out)
	}

	// Each sample, copied as its comments say, passes the installed ciped's checks: the
	// scripts and paths it names exist.
	in("echo '203.0.113.9 hub.example.net proxy.example.net' >> /etc/hosts")
	for _, sample := range sampleInstalls(t) {
		out := in("cd /usr/share/doc/ciped/samples && " + sample.commands + " && ciped check -o " + sample.installed)
		if !strings.Contains(out, "options are valid") {
			t.Errorf("%s installed from the package: ciped check says\n%s", sample.sample, out)
		}
	}

	// remove: the program goes, the admin's files and changed conffiles stay.
	in("echo '# the admin was here' >> /etc/cipe/ip-up")
	in("apt remove -y ciped")
	if status := in("dpkg-query -W -f='${Status}' ciped"); status != "deinstall ok config-files" {
		t.Errorf("after apt remove: status %q, want config-files", status)
	}
	for _, gone := range []string{"usr/sbin/ciped", "lib/systemd/system/ciped@.service", "usr/share/doc/ciped/PROTOCOL.md"} {
		if exists(gone) {
			t.Errorf("after apt remove: /%s is still there", gone)
		}
	}
	if b, _ := os.ReadFile(at("etc/cipe/ip-up")); !bytes.Contains(b, []byte("the admin was here")) {
		t.Error("after apt remove: the admin's changed /etc/cipe/ip-up is gone")
	}
	if !exists("etc/cipe/options.office-b") {
		t.Error("after apt remove: the admin's /etc/cipe/options.office-b is gone")
	}

	// purge: the conffiles go; what the admin made stays.
	in("apt purge -y ciped")
	if status := in("dpkg-query -W -f='${Status}' ciped 2>&1 || true"); strings.Contains(status, "config-files") || strings.Contains(status, "installed") {
		t.Errorf("after apt purge: %q", status)
	}
	for _, gone := range []string{"etc/cipe/ip-up", "etc/cipe/ip-down", "etc/cipe/ip-up.routes"} {
		if exists(gone) {
			t.Errorf("after apt purge: /%s is still there", gone)
		}
	}
	if !exists("etc/cipe/options.office-b") {
		t.Error("apt purge removed the admin's /etc/cipe/options.office-b")
	}
}

// command says whether a program is on PATH.
func command(name string) bool { _, err := exec.LookPath(name); return err == nil }

// rootCopy is a private mount namespace in which /etc, /usr and /var are overlays on
// this machine's: what is done in it (through nsenter) is seen at view and vanishes
// with it.
type rootCopy struct {
	pid  int
	view string // /proc/PID/root: the namespace's / seen from here
}

// throwawayRoot makes a rootCopy and removes it when the test ends (its one process
// killed by PID; the overlays go with the namespace).
func throwawayRoot(t *testing.T) rootCopy {
	t.Helper()
	dir := t.TempDir()
	var script []string
	for _, d := range []string{"etc", "usr", "var"} {
		upper, work := filepath.Join(dir, d, "upper"), filepath.Join(dir, d, "work")
		script = append(script, "mkdir -p "+upper+" "+work,
			fmt.Sprintf("mount -t overlay overlay -o lowerdir=/%s,upperdir=%s,workdir=%s /%s", d, upper, work, d))
	}
	script = append(script, "echo ready", "exec sleep 3600")
	cmd := exec.Command("unshare", "-m", "--propagation", "private", "sh", "-ec", strings.Join(script, "\n"))
	stdout, _ := cmd.StdoutPipe()
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("unshare: %v", err)
	}
	t.Cleanup(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		cmd.Wait()
	})
	ready := make(chan bool, 1)
	go func() {
		line, _ := bufio.NewReader(stdout).ReadString('\n')
		ready <- line == "ready\n"
	}()
	select {
	case ok := <-ready:
		if !ok {
			t.Fatalf("making the overlays failed: %s", stderr.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("making the overlays did not finish: %s", stderr.String())
	}
	return rootCopy{pid: cmd.Process.Pid, view: fmt.Sprintf("/proc/%d/root", cmd.Process.Pid)}
}
