package main

// The version ciped reports (--version, status, the start-up line).

import (
	"fmt"
	"runtime/debug"
)

// version is set by the build (-ldflags "-X main.version=..."); otherwise the module's.
var version = ""

func versionString() string {
	v := version
	goVersion := ""
	if info, ok := debug.ReadBuildInfo(); ok {
		goVersion = info.GoVersion
		if v == "" {
			v = info.Main.Version
			for _, s := range info.Settings {
				if s.Key == "vcs.revision" && len(s.Value) >= 12 {
					v += " " + s.Value[:12]
				}
			}
		}
	}
	if v == "" || v == "(devel)" {
		v = "devel"
	}
	return fmt.Sprintf("ciped %s (%s)", v, goVersion)
}
