package main

// The version ciped reports (--version, status, the start-up line): the release in the
// VERSION file (or the version a package build sets), the commit it was built from, once,
// and the Go it was built with.

import (
	_ "embed"
	"fmt"
	"runtime/debug"
	"strings"
)

//go:embed VERSION
var release string

// version, when a build sets it (-ldflags "-X main.version=..."), replaces the release:
// a package's own version, for one.
var version = ""

func versionString() string {
	v := strings.TrimSpace(release)
	if version != "" {
		v = version
	}
	commit, modified, goVersion := "", false, ""
	if info, ok := debug.ReadBuildInfo(); ok {
		goVersion = info.GoVersion
		for _, s := range info.Settings {
			switch s.Key {
			case "vcs.revision":
				commit = s.Value[:min(12, len(s.Value))]
			case "vcs.modified":
				modified = s.Value == "true"
			}
		}
	}
	var parts []string
	if commit != "" && !strings.Contains(v, commit[:min(7, len(commit))]) {
		if modified {
			commit += "+changes"
		}
		parts = append(parts, "commit "+commit)
	}
	if goVersion != "" {
		parts = append(parts, goVersion)
	}
	if len(parts) == 0 {
		return "ciped " + v
	}
	return fmt.Sprintf("ciped %s (%s)", v, strings.Join(parts, ", "))
}
