package main

// Options: CIPE's names and meanings, three sources (command line > -o FILE >
// /etc/cipe/options > defaults), and the checks that turn them into a config. Every
// mistake is reported here, before a device or socket is touched.

import (
	"bufio"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/alecthomas/kong"
)

const (
	systemOptionsPath = "/etc/cipe/options"
	defaultIPUp       = "/etc/cipe/ip-up"
	defaultIPDown     = "/etc/cipe/ip-down"
	defaultDevice     = "cipcb%d" // the kernel picks the first free number
	minMTU            = 576       // smallest IPv4 packet every host must accept
	minMTUIPv6        = 1280      // IPv6 minimum link MTU (RFC 8200)
	maxMTU            = 9000      // jumbo frames; the receive buffers are sized from it
	maxOptionsLine    = 4096      // longer lines in an options file are refused
)

// usageError is bad input: the process prints it and exits with status 2. missing marks
// an essential option not given at all (a key, ipaddr, peer).
type usageError struct {
	msg, hint string
	missing   bool
}

func (e *usageError) Error() string { return e.msg }

func usagef(format string, args ...any) *usageError {
	return &usageError{msg: fmt.Sprintf(format, args...)}
}

func (e *usageError) withHint(format string, args ...any) *usageError {
	e.hint = fmt.Sprintf(format, args...)
	return e
}

// Option value types. Each parses one value and says what is wrong with it in a sentence
// that can follow "name: ". The key never repeats its input.

// seconds is a duration given as whole seconds ("10"), as CIPE did, or with a unit
// ("1.5s", "500ms", "10m").
type seconds struct{ time.Duration }

func (s *seconds) UnmarshalText(b []byte) error {
	text := string(b)
	if n, err := strconv.ParseUint(text, 10, 32); err == nil {
		s.Duration = time.Duration(n) * time.Second
		return nil
	}
	d, err := time.ParseDuration(text)
	if err != nil || d < 0 {
		return fmt.Errorf("%q is not a number of seconds", text)
	}
	s.Duration = d
	return nil
}

// number is an integer option that remembers whether it was given.
type number struct {
	v   int64
	set bool
}

func (n *number) UnmarshalText(b []byte) error {
	v, err := strconv.ParseInt(string(b), 10, 32)
	if err != nil {
		return fmt.Errorf("%q is not a whole number", b)
	}
	n.v, n.set = v, true
	return nil
}

// ipOption is a tunnel address: an IPv4 or IPv6 address without port or prefix.
type ipOption struct{ netip.Addr }

func (a *ipOption) UnmarshalText(b []byte) error {
	addr, err := netip.ParseAddr(string(b))
	if err != nil || addr.Zone() != "" {
		return fmt.Errorf("%q is not an IP address", b)
	}
	a.Addr = addr.Unmap()
	return nil
}

// ptpOption is ptpaddr: the peer's tunnel address, or a prefix (ADDR/BITS) within which
// the address the peer claims is learned.
type ptpOption struct {
	addr   netip.Addr
	prefix netip.Prefix
}

func (p *ptpOption) UnmarshalText(b []byte) error {
	if pr, err := netip.ParsePrefix(string(b)); err == nil {
		if pr.Addr().Zone() != "" {
			return fmt.Errorf("%q is not an IP address or prefix", b)
		}
		if pr.Bits() < unmapBits(pr.Addr()) {
			return fmt.Errorf("%q: an IPv4-mapped prefix needs at least 96 bits", b)
		}
		p.prefix, p.addr = netip.PrefixFrom(pr.Addr().Unmap(), pr.Bits()-unmapBits(pr.Addr())), netip.Addr{}
		return nil
	}
	var a ipOption
	if err := a.UnmarshalText(b); err != nil {
		return fmt.Errorf("%q is not an IP address or prefix (ADDR/BITS)", b)
	}
	p.addr, p.prefix = a.Addr, netip.Prefix{}
	return nil
}

// unmapBits is how many bits of a prefix's length an IPv4-mapped address spends on its
// mapping.
func unmapBits(a netip.Addr) int {
	if a.Is4In6() {
		return 96
	}
	return 0
}

// endpointOption is a carrier address, HOST:PORT, where HOST may be a name and PORT a
// service name. It is resolved when the options are complete.
type endpointOption struct {
	host, port string
	set        bool
}

func (e *endpointOption) UnmarshalText(b []byte) error {
	text := string(b)
	host, port, err := net.SplitHostPort(text)
	if err != nil {
		if strings.Count(text, ":") > 1 && !strings.HasPrefix(text, "[") {
			return fmt.Errorf("%q: write an IPv6 address in brackets, as [ADDR]:PORT", text)
		}
		return fmt.Errorf("%q is not of the form ADDR:PORT", text)
	}
	if host == "" || port == "" {
		return fmt.Errorf("%q is not of the form ADDR:PORT", text)
	}
	*e = endpointOption{host: host, port: port, set: true}
	return nil
}

func (e endpointOption) String() string { return net.JoinHostPort(e.host, e.port) }

// keyOption is the 128-bit link key: 32 hex digits.
type keyOption struct {
	k   [linkKeySize]byte
	set bool
}

func (k *keyOption) UnmarshalText(b []byte) error {
	if len(b) != 2*linkKeySize {
		return fmt.Errorf("must be %d hex digits (got %d characters)", 2*linkKeySize, len(b))
	}
	if _, err := hex.Decode(k.k[:], b); err != nil {
		return fmt.Errorf("must be %d hex digits (found a character that is not one)", 2*linkKeySize)
	}
	k.set = true
	return nil
}

// String keeps the key out of any formatted output.
func (k keyOption) String() string { return "(hidden)" }

// cli is the command line as kong sees it. The CIPE options are flags of the run
// command; name=value words are rewritten to --name=value before kong parses them.
type cli struct {
	Version kong.VersionFlag `help:"Print the version and exit."`
	Options string           `short:"o" name:"options" placeholder:"FILE" help:"Read options from FILE after ${system_options} (name value, one per line)."`

	Opts runOptions `embed:""`

	Run    struct{}  `cmd:"" default:"withargs" hidden:"" help:"Run the tunnel (the default)."`
	Check  struct{}  `cmd:"" help:"Check the options as start-up would, creating nothing (exit 0, or 2 with the reason)."`
	Genkey struct{}  `cmd:"" help:"Print a new random key line for an options file."`
	Status statusCmd `cmd:"" help:"Show the running links (all, or the one of DEVICE)."`

	// Where the system-wide options file is; tests point it elsewhere.
	systemOptions string
	// Where each option's value came from, for error messages.
	origins map[string]string
}

// statusCmd is `ciped status [DEVICE] [--json]`.
type statusCmd struct {
	Device  string `arg:"" optional:"" help:"Interface name (default: every link)."`
	JSON    bool   `name:"json" xor:"format" help:"Print JSON."`
	Metrics bool   `name:"metrics" xor:"format" help:"Print every link's metrics in the Prometheus text format."`
}

// runOptions holds CIPE's options (and a few of ciped's own, after them).
type runOptions struct {
	Key     keyOption      `name:"key" placeholder:"HEX" help:"Link key, 32 hex digits; only in an options file."`
	Oldkey  keyOption      `name:"oldkey" placeholder:"HEX" help:"The link key being replaced: accepted from the peer, never used to initiate; only in an options file."`
	Nokey   bool           `name:"nokey" help:"No encryption at all: plain IP in UDP, for testing."`
	Me      endpointOption `name:"me" placeholder:"ADDR:PORT" help:"Local carrier address (default: any address, a port the system picks)."`
	Peer    endpointOption `name:"peer" placeholder:"ADDR:PORT" help:"Peer carrier address; 0.0.0.0:0 accepts whoever authenticates first."`
	Ipaddr  ipOption       `name:"ipaddr" placeholder:"IP" help:"Our tunnel address."`
	Ptpaddr ptpOption      `name:"ptpaddr" placeholder:"IP" help:"The peer's tunnel address; 0.0.0.0 or unset: learn it from the peer; ADDR/BITS: learn it within that prefix."`
	Mtu     number         `name:"mtu" placeholder:"N" help:"Interface MTU (default: 1440 over an IPv4 carrier, 1420 over IPv6)."`
	Cttl    number         `name:"cttl" placeholder:"N" help:"TTL of carrier packets; 0 copies the inner packet's TTL (default 0)."`
	Metric  number         `name:"metric" placeholder:"N" help:"Metric of the route to ptpaddr (default: the kernel's)."`
	Device  string         `name:"device" placeholder:"NAME" help:"Interface name (default: the first free cipcbN)."`
	Debug   bool           `name:"debug" help:"Log every event in detail."`
	Syslog  bool           `name:"syslog" help:"Log to syslog (facility daemon) instead of stderr."`
	Tokxc   seconds        `name:"tokxc" default:"10" placeholder:"SECONDS" help:"Longest wait before an unanswered key exchange is tried again; the first after 1 s (default 10)."`
	Tokey   seconds        `name:"tokey" default:"600" placeholder:"SECONDS" help:"Session key lifetime (default 600)."`
	Tokxts  seconds        `name:"tokxts" default:"0" placeholder:"SECONDS" help:"Key exchange timestamp window; 0 is off (default 0)."`
	Ping    seconds        `name:"ping" default:"0" placeholder:"SECONDS" help:"Keepalive interval; 0 is off (default 0)."`
	Toping  seconds        `name:"toping" default:"0" placeholder:"SECONDS" help:"Link is down after this long without word from the peer; 0 is off (default 0)."`
	Maxerr  number         `name:"maxerr" placeholder:"N" help:"ICMP errors about datagrams to the peer tolerated while it does not answer probes; -1 is any number (default 8)."`
	Ipup    string         `name:"ipup" placeholder:"PATH" help:"Script run when the link comes up (default ${default_ipup}, if it exists; none: no script)."`
	Ipdown  string         `name:"ipdown" placeholder:"PATH" help:"Script run when the link goes down (default ${default_ipdown}, if it exists; none: no script)."`
	Arg     string         `name:"arg" placeholder:"STRING" help:"Extra argument for the scripts (their $$6)."`
	Socks   endpointOption `name:"socks" placeholder:"ADDR:PORT" help:"Reach the peer through this SOCKS5 server (UDP ASSOCIATE)."`
	Cipher  string         `name:"cipher" default:"auto" enum:"auto,aes-gcm,chacha20-poly1305" placeholder:"NAME" help:"Data cipher to offer: auto (AES-256-GCM only with AES hardware), aes-gcm, chacha20-poly1305."`

	Rpfilter   bool `name:"rpfilter" default:"true" help:"Accept from the tunnel only packets whose source this host routes back through it (default yes)."`
	Tunoffload bool `name:"tunoffload" default:"true" help:"TUN offloads: the kernel hands over and takes back TCP/UDP super-packets (default yes)."`
	Udpgso     bool `name:"udpgso" default:"true" help:"UDP GSO: send runs of datagrams with one system call (default yes)."`
	Udpgro     bool `name:"udpgro" default:"true" help:"UDP GRO: receive runs of datagrams with one system call (default yes)."`
}

// config is a complete, checked set of options: what the tunnel runs with.
type config struct {
	key      *[linkKeySize]byte // nil with nokey
	oldkey   *[linkKeySize]byte // the key being replaced: accepted, never used to initiate; nil: none
	me       netip.AddrPort     // unspecified address and/or port 0: the system picks
	peer     netip.AddrPort     // unspecified: learn from the first peer that authenticates
	ipaddr   netip.Addr
	ptpaddr  netip.Addr   // invalid: learn from the peer
	ptpRange netip.Prefix // valid: learn within it (ptpaddr is then invalid)
	mtu      int
	cttl     int
	metric   int // -1: not set
	device   string
	debug    bool
	syslog   bool
	tokxc    time.Duration
	tokey    time.Duration
	tokxts   time.Duration
	ping     time.Duration
	toping   time.Duration
	maxerr   int
	ipup     string // "" if no script should run
	ipdown   string
	arg      string
	ciphers  cipherSuite
	socks    netip.AddrPort // invalid: no proxy

	rpfilter                   bool // inner sources must be routed back through the tunnel
	tunOffload, udpGSO, udpGRO bool
}

// dynamicPeer reports whether the peer's carrier address is learned.
func (c *config) dynamicPeer() bool { return !c.peer.Addr().IsValid() || c.peer.Addr().IsUnspecified() }

// optionNames lists the tunnel options by name: every flag but ciped's own few.
func optionNames(model *kong.Application) map[string]*kong.Flag {
	names := map[string]*kong.Flag{}
	for _, f := range model.Flags {
		switch f.Name {
		case "help", "version", "options":
		default:
			names[f.Name] = f
		}
	}
	return names
}

// checkValue parses value as option f would, into a scratch variable, so that a bad
// value is reported with its source before kong sees it.
func checkValue(f *kong.Flag, value string) error {
	if f.Enum != "" {
		if !f.EnumMap()[value] {
			return fmt.Errorf("%q is not one of %s", value, strings.ReplaceAll(f.Enum, ",", ", "))
		}
		return nil
	}
	target := reflect.New(f.Target.Type()).Elem()
	scan := kong.Scan().PushTyped(value, kong.FlagValueToken)
	return f.Mapper.Decode(&kong.DecodeContext{Value: f.Value, Scan: scan}, target)
}

// suggest names the known option closest to an unknown one, if one is close.
func suggest(name string, names map[string]*kong.Flag) string {
	best, bestDist := "", 3
	for n := range names {
		if d := editDistance(name, n); d < bestDist || (d == bestDist && n < best) {
			best, bestDist = n, d
		}
	}
	if best == "" {
		return ""
	}
	return fmt.Sprintf(" (did you mean %q?)", best)
}

func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur := make([]int, len(b)+1)
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev = cur
	}
	return prev[len(b)]
}

// rewriteArgs turns CIPE's name=value words (and bare boolean names) into kong flags,
// checking names and values on the way. The key is refused: the command line of a
// process can be read by every user of the machine.
func rewriteArgs(args []string, names map[string]*kong.Flag) ([]string, map[string]string, error) {
	out := make([]string, 0, len(args))
	origins := map[string]string{}
	commands := map[string]bool{"genkey": true, "run": true, "status": true, "check": true}
	oFile := ""
	once := func(file string) error {
		if oFile != "" {
			return usagef("-o is given twice (%q and %q): ciped reads one options file besides %s", oFile, file,
				systemOptionsPath).withHint("put the options of both into one file")
		}
		oFile = file
		return nil
	}
	for i := 0; i < len(args); i++ {
		arg := args[i]
		switch {
		case arg == "-o" || arg == "--options":
			if i+1 >= len(args) {
				return nil, nil, usagef("%s needs a file name", arg)
			}
			if err := once(args[i+1]); err != nil {
				return nil, nil, err
			}
			out = append(out, arg, args[i+1])
			i++
			continue
		case strings.HasPrefix(arg, "-o") || strings.HasPrefix(arg, "--options="):
			if err := once(strings.TrimPrefix(strings.TrimPrefix(arg, "--options="), "-o")); err != nil {
				return nil, nil, err
			}
			out = append(out, arg)
			continue
		case arg == "-h" || arg == "--help" || arg == "--version":
			out = append(out, arg)
			continue
		case commands[arg] && len(out) == 0:
			out = append(out, arg)
			if arg == "status" { // its words are its own: DEVICE, --json
				return append(out, args[i+1:]...), origins, nil
			}
			continue
		}
		word := strings.TrimPrefix(arg, "--")
		name, value, hasValue := strings.Cut(word, "=")
		if name == "key" || name == "oldkey" {
			return nil, nil, usagef("the %s must not be given on the command line, where any user can read it (ps)", name).
				withHint("put \"%s HEX\" in an options file of mode 0600, e.g. %s", name, systemOptionsPath)
		}
		f, known := names[name]
		if !known || strings.HasPrefix(arg, "-") && !strings.HasPrefix(arg, "--") {
			if strings.HasPrefix(arg, "-") {
				return nil, nil, usagef("unknown flag %q%s", name, suggest(strings.TrimLeft(name, "-"), names))
			}
			return nil, nil, usagef("unknown option %q%s", name, suggest(name, names))
		}
		if !hasValue {
			if !f.IsBool() {
				if strings.HasPrefix(arg, "--") && i+1 < len(args) {
					i++
					value, hasValue = args[i], true
				} else {
					return nil, nil, usagef("option %q needs a value: %s=%s", name, name, f.FormatPlaceHolder())
				}
			} else {
				value = "true"
			}
		}
		if err := checkValue(f, value); err != nil {
			return nil, nil, usagef("%s: %v", name, err)
		}
		out = append(out, "--"+name+"="+value)
		origins[name] = "command line"
	}
	return out, origins, nil
}

// fileOption is one "name value" line of an options file.
type fileOption struct {
	name, value string
	line        int
}

// parseOptionsFile reads CIPE's options file syntax: one "name value" per line (or
// name=value), blanks between, # to the end of the line is a comment, a boolean may be
// named alone. A key line may end in md5sum's " -". It checks syntax only.
func parseOptionsFile(path string, r io.Reader) ([]fileOption, error) {
	var opts []fileOption
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 256), maxOptionsLine)
	line := 0
	for sc.Scan() {
		line++
		raw := sc.Text()
		if line == 1 {
			raw = strings.TrimPrefix(raw, "\ufeff") // a byte-order mark some editors write
		}
		text, _, _ := strings.Cut(raw, "#")
		fields := strings.Fields(text)
		if len(fields) == 0 {
			continue
		}
		name, value, hasEq := strings.Cut(fields[0], "=")
		rest := fields[1:]
		if hasEq && value != "" {
			rest = append([]string{value}, rest...)
		}
		if name == "" {
			return nil, usagef("%s:%d: a line must start with an option name", path, line)
		}
		if name == "key" && len(rest) == 2 && rest[1] == "-" {
			rest = rest[:1] // "key HEX  -", as md5sum writes it
		}
		switch {
		case len(rest) == 0:
			value = ""
		case name == "arg":
			value = strings.Join(rest, " ")
		case len(rest) == 1:
			value = rest[0]
		default:
			return nil, usagef("%s:%d: option %q takes one value, got %d", path, line, name, len(rest))
		}
		opts = append(opts, fileOption{name: name, value: value, line: line})
	}
	if err := sc.Err(); err != nil {
		if errors.Is(err, bufio.ErrTooLong) {
			return nil, usagef("%s:%d: line longer than %d bytes", path, line+1, maxOptionsLine)
		}
		return nil, usagef("%s: %v", path, err)
	}
	return opts, nil
}

// optionsSource is a loaded options file; as a kong resolver it answers with its values.
type optionsSource struct {
	path   string
	values map[string]fileOption
}

func (s *optionsSource) Validate(*kong.Application) error { return nil }

func (s *optionsSource) Resolve(_ *kong.Context, _ *kong.Path, f *kong.Flag) (any, error) {
	if o, ok := s.values[f.Name]; ok {
		return o.value, nil
	}
	return nil, nil
}

// checkOptions checks every name and value of a parsed file against the options.
func checkOptions(path string, opts []fileOption, names map[string]*kong.Flag) (*optionsSource, error) {
	src := &optionsSource{path: path, values: map[string]fileOption{}}
	for _, o := range opts {
		f, ok := names[o.name]
		if !ok {
			return nil, usagef("%s:%d: unknown option %q%s", path, o.line, o.name, suggest(o.name, names))
		}
		if o.value == "" {
			if !f.IsBool() {
				return nil, usagef("%s:%d: option %q needs a value", path, o.line, o.name)
			}
			o.value = "true"
		}
		if err := checkValue(f, o.value); err != nil {
			return nil, usagef("%s:%d: %s: %v", path, o.line, o.name, err)
		}
		if first, twice := src.values[o.name]; twice {
			err := usagef("%s:%d: option %q is given a second time (first on line %d)", path, o.line, o.name, first.line)
			if o.name == "key" {
				err.withHint("to rotate the key, give the new one as key and the one being replaced as oldkey")
			}
			return nil, err
		}
		src.values[o.name] = o
	}
	return src, nil
}

// loadOptionsFile reads and checks an options file. A missing file is an error only if
// required. Because options name scripts that run as root, a file must belong to the
// user running ciped and must not be writable by others; one holding the key must not be
// readable by others either.
func loadOptionsFile(path string, required bool, names map[string]*kong.Flag) (*optionsSource, error) {
	f, err := os.Open(path)
	if err != nil {
		if !required && errors.Is(err, os.ErrNotExist) {
			return nil, nil
		}
		return nil, usagef("options file: %v", err)
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return nil, usagef("options file: %v", err)
	}
	if !info.Mode().IsRegular() {
		return nil, usagef("options file %q is not a regular file", path)
	}
	opts, err := parseOptionsFile(path, f)
	if err != nil {
		return nil, err
	}
	src, err := checkOptions(path, opts, names)
	if err != nil {
		return nil, err
	}
	_, hasKey := src.values["key"]
	_, hasOld := src.values["oldkey"]
	hasKey = hasKey || hasOld
	if err := checkOptionsFileMode(path, info, hasKey); err != nil {
		return nil, err
	}
	return src, nil
}

func checkOptionsFileMode(path string, info os.FileInfo, hasKey bool) error {
	if err := checkTrustedFile(path, info, "options file"); err != nil {
		var ue *usageError
		if errors.As(err, &ue) && strings.HasPrefix(ue.hint, "chmod go-w "+path) {
			ue.hint = "chmod 600 " + path
		}
		return err
	}
	if mode := info.Mode().Perm(); hasKey && mode&0o044 != 0 {
		return usagef("options file %q holds the key but is readable by group or others (mode %04o)", path, mode).
			withHint("chmod 600 %s", path)
	}
	return nil
}

// BeforeResolve adds the options files as resolvers when the tunnel is to run: first
// the system file, then -o FILE, so that -o wins over the system file, and the command
// line (which kong applies first) over both.
func (c *cli) BeforeResolve(ctx *kong.Context) error {
	if cmd := ctx.Command(); cmd != "run" && cmd != "check" {
		return nil
	}
	names := optionNames(ctx.Model)
	oPath := ""
	for _, f := range ctx.Flags() {
		if f.Name == "options" {
			if v, ok := ctx.FlagValue(f).(string); ok {
				oPath = v
			}
		}
	}
	for _, file := range []struct {
		path     string
		required bool
	}{{c.systemOptions, false}, {oPath, true}} {
		if file.path == "" {
			continue
		}
		src, err := loadOptionsFile(file.path, file.required, names)
		if err != nil {
			return err
		}
		if src == nil {
			continue
		}
		for name, o := range src.values {
			if c.origins[name] != "command line" {
				c.origins[name] = fmt.Sprintf("%s:%d", src.path, o.line)
			}
		}
		ctx.AddResolver(src)
	}
	return nil
}

// origin names where an option's value came from, for messages.
func (c *cli) origin(name string) string {
	if o, ok := c.origins[name]; ok {
		return fmt.Sprintf("%s (%s)", name, o)
	}
	return name
}

// resolveEndpoint turns HOST:PORT into an address, preferring the given family (4 or 6;
// 0 for no preference). A name that does not resolve is an error.
func resolveEndpoint(e endpointOption, family int) (netip.AddrPort, error) {
	port, err := strconv.ParseUint(e.port, 10, 16)
	switch {
	case err == nil:
	case strings.Trim(e.port, "0123456789") == "":
		return netip.AddrPort{}, fmt.Errorf("port %s is out of range (0 to 65535)", e.port)
	default:
		p, lerr := net.LookupPort("udp", e.port)
		if lerr != nil {
			return netip.AddrPort{}, fmt.Errorf("unknown port or service %q", e.port)
		}
		port = uint64(p)
	}
	if addr, err := netip.ParseAddr(e.host); err == nil {
		if addr.Zone() != "" {
			return netip.AddrPort{}, fmt.Errorf("%q: zones are not supported", e.host)
		}
		return netip.AddrPortFrom(addr.Unmap(), uint16(port)), nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	addrs, err := net.DefaultResolver.LookupNetIP(ctx, "ip", e.host)
	if err != nil || len(addrs) == 0 {
		return netip.AddrPort{}, fmt.Errorf("cannot resolve %q", e.host)
	}
	pick := addrs[0].Unmap()
	for _, a := range addrs {
		a = a.Unmap()
		if (family == 4 && a.Is4()) || (family == 6 && a.Is6()) {
			pick = a
			break
		}
	}
	return netip.AddrPortFrom(pick, uint16(port)), nil
}

func familyOf(a netip.Addr) int {
	if a.Is4() {
		return 4
	}
	return 6
}

// config checks the options as a whole and returns the configuration to run.
func (c *cli) config() (*config, error) {
	r := &c.Opts
	cfg := &config{
		ipaddr: r.Ipaddr.Addr, ptpaddr: r.Ptpaddr.addr, ptpRange: r.Ptpaddr.prefix.Masked(), cttl: int(r.Cttl.v), metric: -1,
		device: r.Device, debug: r.Debug, syslog: r.Syslog, tokxc: r.Tokxc.Duration, tokey: r.Tokey.Duration,
		tokxts: r.Tokxts.Duration, ping: r.Ping.Duration, toping: r.Toping.Duration, maxerr: 8,
		ipup: r.Ipup, ipdown: r.Ipdown, arg: r.Arg,
		rpfilter: r.Rpfilter, tunOffload: r.Tunoffload, udpGSO: r.Udpgso, udpGRO: r.Udpgro,
	}
	switch {
	case r.Key.set && r.Nokey:
		return nil, usagef("key (%s) and nokey exclude each other", c.origins["key"]).
			withHint("remove one of them")
	case !r.Key.set && !r.Nokey:
		err := usagef("no key given").
			withHint("put a key line in an options file (ciped genkey makes one), or set nokey for an unencrypted test link")
		err.missing = true
		return nil, err
	case r.Key.set && r.Key.k == [linkKeySize]byte{}:
		return nil, usagef("%s: the key is all zeros, a placeholder (as in the sample options file)", c.origin("key")).
			withHint("make a real one with: ciped genkey")
	case r.Key.set:
		k := r.Key.k
		cfg.key = &k
	}
	if r.Oldkey.set {
		switch {
		case !r.Key.set:
			return nil, usagef("%s: an oldkey needs a key: the one it is being replaced with", c.origin("oldkey"))
		case r.Oldkey.k == [linkKeySize]byte{}:
			return nil, usagef("%s: the old key is all zeros, a placeholder", c.origin("oldkey"))
		case r.Oldkey.k == r.Key.k:
			return nil, usagef("%s: the old key is the key itself", c.origin("oldkey")).
				withHint("once both ends have the new key, remove the oldkey line and reload")
		}
		k := r.Oldkey.k
		cfg.oldkey = &k
	}

	if !r.Ipaddr.IsValid() {
		err := usagef("ipaddr is required: the tunnel address of this end").withHint("e.g. ipaddr=10.0.0.1")
		err.missing = true
		return nil, err
	}
	if why := notATunnelAddress(cfg.ipaddr); why != "" {
		return nil, usagef("%s: %s cannot be the tunnel address: %s", c.origin("ipaddr"), cfg.ipaddr, why)
	}
	if cfg.ptpaddr.IsValid() && cfg.ptpaddr.IsUnspecified() {
		cfg.ptpaddr = netip.Addr{} // 0.0.0.0: learn it
	}
	if cfg.ptpaddr.IsValid() {
		if cfg.ptpaddr.Is4() != cfg.ipaddr.Is4() {
			return nil, usagef("ipaddr %s and ptpaddr %s are not of the same IP version", cfg.ipaddr, cfg.ptpaddr)
		}
		if cfg.ptpaddr == cfg.ipaddr {
			return nil, usagef("ipaddr and ptpaddr are both %s", cfg.ipaddr)
		}
		if why := notATunnelAddress(cfg.ptpaddr); why != "" {
			return nil, usagef("%s: %s cannot be the peer's tunnel address: %s", c.origin("ptpaddr"), cfg.ptpaddr, why)
		}
	}
	if p := cfg.ptpRange; p.IsValid() {
		if p.Addr().Is4() != cfg.ipaddr.Is4() {
			return nil, usagef("ipaddr %s and ptpaddr %s are not of the same IP version", cfg.ipaddr, p)
		}
		if p.Bits() == 0 {
			return nil, usagef("%s: %s allows any address: leave ptpaddr out to learn any", c.origin("ptpaddr"), p)
		}
	}

	if !r.Peer.set {
		err := usagef("peer is required: the carrier address of the other end").
			withHint("e.g. peer=192.0.2.1:6789, or peer=0.0.0.0:0 to accept whoever authenticates first")
		err.missing = true
		return nil, err
	}
	family := 0
	if r.Me.set {
		if a, err := netip.ParseAddr(r.Me.host); err == nil {
			family = familyOf(a.Unmap())
		}
	}
	peer, err := resolveEndpoint(r.Peer, family)
	if err != nil {
		return nil, usagef("%s: %v", c.origin("peer"), err)
	}
	if peer.Addr().IsUnspecified() != (peer.Port() == 0) {
		return nil, usagef("%s: %s: give both address and port, or 0.0.0.0:0 to accept any peer", c.origin("peer"), peer)
	}
	if peer.Addr().IsMulticast() {
		return nil, usagef("%s: %s is a multicast address", c.origin("peer"), peer)
	}
	cfg.peer = peer
	if r.Me.set {
		me, err := resolveEndpoint(r.Me, familyOf(peer.Addr()))
		if err != nil {
			return nil, usagef("%s: %v", c.origin("me"), err)
		}
		if me.Addr().Is4() != peer.Addr().Is4() {
			return nil, usagef("me %s and peer %s are not of the same IP version", me, peer)
		}
		cfg.me = me
	} else if peer.Addr().Is4() {
		cfg.me = netip.AddrPortFrom(netip.IPv4Unspecified(), 0)
	} else {
		cfg.me = netip.AddrPortFrom(netip.IPv6Unspecified(), 0)
	}

	if r.Socks.set {
		if cfg.dynamicPeer() {
			return nil, usagef("%s: through a SOCKS proxy the peer's address must be given", c.origin("socks")).
				withHint("set peer=ADDR:PORT; the other end can take peer=0.0.0.0:0")
		}
		proxy, err := resolveEndpoint(r.Socks, familyOf(cfg.me.Addr()))
		if err != nil {
			return nil, usagef("%s: %v", c.origin("socks"), err)
		}
		if proxy.Addr().IsUnspecified() || proxy.Port() == 0 {
			return nil, usagef("%s: %s is not a proxy address", c.origin("socks"), proxy)
		}
		cfg.socks = proxy
		// Each datagram carries its own SOCKS header: no batches of one size for GSO and
		// GRO to work on.
		cfg.udpGSO, cfg.udpGRO = false, false
	}
	overhead := carrierIPv4Overhead
	if cfg.me.Addr().Is6() {
		overhead = carrierIPv6Overhead
	}
	if cfg.socks.IsValid() {
		overhead += socksHeaderSize(cfg.peer.Addr()) // on the way to the relay
	}
	if r.Nokey {
		cfg.mtu = carrierPathMTU - overhead
	} else {
		cfg.mtu = carrierPathMTU - overhead - dataOverhead
	}
	if r.Mtu.set {
		cfg.mtu = int(r.Mtu.v)
		if cfg.mtu < minMTU || cfg.mtu > maxMTU {
			return nil, usagef("%s: %d is out of range (%d to %d)", c.origin("mtu"), cfg.mtu, minMTU, maxMTU)
		}
	}
	if cfg.ipaddr.Is6() && cfg.mtu < minMTUIPv6 {
		return nil, usagef("%s: an IPv6 tunnel needs an MTU of at least %d, not %d", c.origin("mtu"), minMTUIPv6, cfg.mtu)
	}
	if cfg.cttl < 0 || cfg.cttl > 255 {
		return nil, usagef("%s: %d is out of range (0 to 255)", c.origin("cttl"), cfg.cttl)
	}
	if r.Metric.set {
		if r.Metric.v < 0 {
			return nil, usagef("%s: %d is out of range (0 or more)", c.origin("metric"), r.Metric.v)
		}
		cfg.metric = int(r.Metric.v)
	}
	if r.Maxerr.set {
		if r.Maxerr.v < -1 {
			return nil, usagef("%s: %d is out of range (-1 or more)", c.origin("maxerr"), r.Maxerr.v)
		}
		cfg.maxerr = int(r.Maxerr.v)
	}
	if cfg.device == "" {
		cfg.device = defaultDevice
	} else if err := checkDeviceName(cfg.device); err != nil {
		return nil, usagef("%s: %v", c.origin("device"), err)
	}
	if cfg.tokxc <= 0 {
		return nil, usagef("%s: must be more than 0", c.origin("tokxc"))
	}
	if cfg.tokey <= 0 {
		return nil, usagef("%s: must be more than 0", c.origin("tokey"))
	}
	if cfg.toping > 0 && cfg.ping == 0 {
		return nil, usagef("%s: toping needs ping (keepalives) to be set", c.origin("toping"))
	}
	if cfg.toping > 0 && cfg.toping <= cfg.ping {
		return nil, usagef("%s: toping (%v) must be longer than ping (%v)", c.origin("toping"), cfg.toping, cfg.ping)
	}
	for _, s := range []struct {
		path     *string
		name     string
		fallback string
	}{{&cfg.ipup, "ipup", "ip-up"}, {&cfg.ipdown, "ipdown", "ip-down"}} {
		if err := c.checkScript(s.path, s.name, s.fallback); err != nil {
			return nil, err
		}
	}
	switch r.Cipher {
	case "auto":
		cfg.ciphers = cipherChaCha20Poly1305
		if hasAESHardware() {
			cfg.ciphers |= cipherAES256GCM
		}
	case "aes-gcm":
		cfg.ciphers = cipherAES256GCM
	case "chacha20-poly1305":
		cfg.ciphers = cipherChaCha20Poly1305
	}
	return cfg, nil
}

// notATunnelAddress says why an address cannot be a tunnel address of either end, or
// returns "".
func notATunnelAddress(a netip.Addr) string {
	switch {
	case a.IsUnspecified():
		return "it is unspecified"
	case a.IsLoopback():
		return "it is a loopback address"
	case a.IsMulticast():
		return "it is a multicast address"
	case a == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return "it is the broadcast address"
	}
	return ""
}

// noScript is the value of ipup or ipdown that runs no script, not even the default.
const noScript = "none"

// configDir is the directory of the system options file, where the default scripts are
// (/etc/cipe); "" when there is none (tests).
func (c *cli) configDir() string {
	if c.systemOptions == "" {
		return ""
	}
	return filepath.Dir(c.systemOptions)
}

// checkScript turns the value of a script option into the path to run: "" for none
// (noScript, or no default script), else an absolute path that must be an executable
// file as trusted as an options file (checkTrustedFile). An unset option takes the
// default script, dflt in the configuration directory, if that exists.
func (c *cli) checkScript(path *string, name, dflt string) error {
	switch {
	case *path == noScript:
		*path = ""
		return nil
	case *path == "":
		if c.configDir() == "" {
			return nil
		}
		p := filepath.Join(c.configDir(), dflt)
		if _, err := os.Lstat(p); errors.Is(err, os.ErrNotExist) {
			return nil
		}
		*path = p
	}
	abs, err := filepath.Abs(*path) // scripts run in /
	if err != nil {
		return usagef("%s: %v", c.origin(name), err)
	}
	*path = abs
	info, err := os.Stat(abs)
	if err != nil {
		return usagef("%s: %v", c.origin(name), err)
	}
	if !info.Mode().IsRegular() || info.Mode().Perm()&0o111 == 0 {
		return usagef("%s: %q is not an executable file", c.origin(name), abs).
			withHint("chmod 755 %s, or %s=%s to run no script", abs, name, noScript)
	}
	if err := checkTrustedFile(abs, info, fmt.Sprintf("%s: script", c.origin(name))); err != nil {
		return err
	}
	return nil
}

// checkTrustedFile checks that a file ciped reads or runs as root is safe from other
// users: the file (info) belongs to the user running ciped and is not writable by group
// or others, and so is every directory on the way to it (the path with its links
// resolved), where only a root-owned sticky directory such as /tmp may be writable by
// others (they cannot replace what is not theirs there). what names it in the error.
func checkTrustedFile(path string, info os.FileInfo, what string) error {
	uid := os.Geteuid()
	who := "root"
	if uid != 0 {
		who = fmt.Sprintf("uid %d, which runs ciped", uid)
	}
	if st, ok := info.Sys().(*syscall.Stat_t); ok && int(st.Uid) != uid {
		return usagef("%s %q is owned by uid %d, not by %s", what, path, st.Uid, who).
			withHint("chown %d %s", uid, path)
	}
	if mode := info.Mode().Perm(); mode&0o022 != 0 {
		return usagef("%s %q is writable by group or others (mode %04o)", what, path, mode).
			withHint("chmod go-w %s", path)
	}
	real, err := filepath.EvalSymlinks(path)
	if err == nil {
		real, err = filepath.Abs(real)
	}
	if err != nil {
		return usagef("%s %q: %v", what, path, err)
	}
	for dir := filepath.Dir(real); ; dir = filepath.Dir(dir) {
		di, err := os.Stat(dir)
		if err != nil {
			return usagef("%s %q: %v", what, path, err)
		}
		st, _ := di.Sys().(*syscall.Stat_t)
		if st != nil && int(st.Uid) != 0 && int(st.Uid) != uid {
			return usagef("%s %q: the directory %q is owned by uid %d, who could replace it", what, path, dir, st.Uid).
				withHint("chown root %s, or move the file", dir)
		}
		sticky := di.Mode()&os.ModeSticky != 0 && st != nil && st.Uid == 0
		if mode := di.Mode().Perm(); mode&0o022 != 0 && !sticky {
			return usagef("%s %q: the directory %q is writable by group or others (mode %04o), who could replace it",
				what, path, dir, mode).withHint("chmod go-w %s", dir)
		}
		if dir == filepath.Dir(dir) { // the root
			return nil
		}
	}
}

// describeConfig says in a line what a config sets up.
func describeConfig(cfg *config) string {
	ptp := "learned from the peer"
	switch {
	case cfg.ptpaddr.IsValid():
		ptp = cfg.ptpaddr.String()
	case cfg.ptpRange.IsValid():
		ptp = "learned within " + cfg.ptpRange.String()
	}
	peer := cfg.peer.String()
	if cfg.dynamicPeer() {
		peer = "whoever authenticates first"
	}
	keys := "key"
	switch {
	case cfg.key == nil:
		keys = "nokey (UNENCRYPTED)"
	case cfg.oldkey != nil:
		keys = "key and oldkey"
	}
	return fmt.Sprintf("device %s, tunnel %s peer %s, mtu %d, carrier %s to %s, %s", cfg.device, cfg.ipaddr, ptp,
		cfg.mtu, cfg.me, peer, keys)
}

// checkDeviceName accepts what the kernel accepts as an interface name, plus one %d.
func checkDeviceName(name string) error {
	if len(name) >= 16 {
		return fmt.Errorf("%q is longer than 15 characters", name)
	}
	if name == "." || name == ".." || strings.Trim(name, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-%") != "" {
		// The kernel takes more, but the name goes to scripts and firewall rules: only
		// letters, digits, '_', '.', '-'.
		return fmt.Errorf("%q is not a valid interface name (letters, digits, '_', '.', '-')", name)
	}
	if strings.Count(name, "%") > 1 || (strings.Contains(name, "%") && !strings.Contains(name, "%d")) {
		return fmt.Errorf("%q: the only pattern allowed is one %%d", name)
	}
	return nil
}
