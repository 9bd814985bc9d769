//go:build race

package main

// raceEnabled tells end-to-end tests to build ciped with the race detector too.
const raceEnabled = true
