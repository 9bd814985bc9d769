// Command ciped is a point-to-point encrypted IP tunnel in the tradition of CIPE: one
// process per link pairs a TUN interface with one UDP socket. See README and
// PROTOCOL.md.
package main

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/alecthomas/kong"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/tun"
)

// Exit statuses.
const (
	exitOK      = 0
	exitFailure = 1 // the tunnel could not be set up or failed
	exitUsage   = 2 // bad options; nothing was touched
)

func main() {
	hardenProcess()
	os.Exit(runArgs(os.Args[1:], os.Stdout, os.Stderr, systemOptionsPath, nil))
}

// hardenProcess keeps the link key out of reach of other processes of the same user
// (debuggers, /proc/PID/mem) and out of core dumps: the process is made non-dumpable.
func hardenProcess() {
	_ = unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0)
}

// signals are what run reacts to while a link runs: stop (SIGTERM, SIGINT), report
// (SIGUSR1, status to the log) and reload (SIGHUP).
type signals struct {
	stop   <-chan struct{}
	report <-chan struct{}
	reload <-chan struct{}
}

// exitRequest carries kong's request to exit (after --help or --version) out of Parse.
type exitRequest struct{ code int }

// runArgs is the whole program: it parses the command line, then runs the chosen
// command. stop, if not nil, replaces the termination signals (tests close it).
func runArgs(args []string, stdout, stderr io.Writer, systemOptions string, stop <-chan struct{}) (code int) {
	return runWith(args, stdout, stderr, systemOptions, stop, statusDir)
}

// runWith is run with the directory of the status sockets given (tests use their own).
func runWith(args []string, stdout, stderr io.Writer, systemOptions string, stop <-chan struct{}, runDir string) (code int) {
	fail := func(code int, err error) int {
		fmt.Fprintf(stderr, "ciped: error: %v\n", err)
		var ue *usageError
		if errors.As(err, &ue) && ue.hint != "" {
			fmt.Fprintf(stderr, "ciped: hint: %s\n", ue.hint)
		}
		return code
	}
	c := &cli{systemOptions: systemOptions, origins: map[string]string{}}
	cmd, code, err := parseArgs(c, args, stdout, stderr)
	switch {
	case errors.Is(err, errExitRequested):
		return code
	case err != nil:
		return fail(code, err)
	}
	switch cmd {
	case "status <device>", "status":
		return runStatus(stdout, stderr, runDir, c.Status.Device, c.Status.JSON, c.Status.Metrics)
	case "genkey":
		var k [linkKeySize]byte
		if _, err := rand.Read(k[:]); err != nil {
			return fail(exitFailure, err)
		}
		fmt.Fprintf(stdout, "key %s\n", hex.EncodeToString(k[:]))
		return exitOK
	case "check":
		cfg, err := c.config()
		if err == nil {
			err = checkDevice(cfg.device)
		}
		if err != nil {
			return fail(exitUsage, err)
		}
		fmt.Fprintf(stdout, "ciped: options are valid: %s\n", describeConfig(cfg))
		return exitOK
	default:
		cfg, err := c.config()
		var ue *usageError
		if len(args) == 0 && errors.As(err, &ue) && ue.missing {
			fmt.Fprintf(stderr, shortUsage, systemOptions)
			return exitUsage
		}
		if err != nil {
			return fail(exitUsage, err)
		}
		if err := checkDevice(cfg.device); err != nil {
			return fail(exitUsage, err)
		}
		sig := signals{stop: stop}
		if stop == nil {
			sig = watchSignals()
		}
		// A reload reads every source again, as at start.
		reparse := func() (*config, error) {
			c := &cli{systemOptions: systemOptions, origins: map[string]string{}}
			if _, _, err := parseArgs(c, args, io.Discard, io.Discard); err != nil {
				return nil, err
			}
			return c.config()
		}
		if err := runTunnel(cfg, stderr, sig, runDir, reparse); err != nil {
			return fail(exitFailure, err)
		}
		return exitOK
	}
}

// parseArgs parses the command line into c (for the run and check commands, with the
// options files: see cli.BeforeResolve) and returns the command. errExitRequested comes
// with the code kong asked to exit with (--help, --version); any other error with the
// exit status it deserves.
func parseArgs(c *cli, args []string, stdout, stderr io.Writer) (cmd string, code int, err error) {
	parser, err := newParser(c, stdout, stderr)
	if err != nil {
		return "", exitFailure, err
	}
	kargs, origins, err := rewriteArgs(args, optionNames(parser.Model))
	if err != nil {
		return "", exitUsage, err
	}
	c.origins = origins
	defer func() {
		if r := recover(); r != nil {
			req, ok := r.(exitRequest)
			if !ok {
				panic(r)
			}
			code, err = req.code, errExitRequested
		}
	}()
	ctx, err := parser.Parse(kargs)
	if err != nil {
		return "", exitUsage, err
	}
	return ctx.Command(), exitOK, nil
}

var errExitRequested = errors.New("exit requested")

// shortUsage is what `ciped` alone says when it finds no link to run (%s: the system
// options file).
const shortUsage = `usage: ciped [-o FILE] [name=value ...]        run a link
       ciped check [-o FILE] [name=value ...]  check the options, creating nothing
       ciped status [DEVICE] [--json | --metrics]
       ciped genkey                            print a new key line
A link needs a key (in an options file), ipaddr and peer; %s gave none.
ciped --help lists the options; man ciped explains them.
`

// newParser builds the kong parser for c; kong's requests to exit become a panic with an
// exitRequest, which run recovers.
func newParser(c *cli, stdout, stderr io.Writer) (*kong.Kong, error) {
	return kong.New(c,
		kong.Name("ciped"),
		kong.Description("Point-to-point encrypted IP tunnel, CIPE style: ciped [-o FILE] [name=value ...]\n\n"+
			"Options come from "+c.systemOptions+", then -o FILE, then the command line; the later wins. "+
			"Each option below can be given as name=value, --name=value, or as \"name value\" in a file. "+
			"The key is accepted only from a file (mode 0600)."),
		kong.Vars{"system_options": c.systemOptions, "default_ipup": defaultIPUp, "default_ipdown": defaultIPDown,
			"version": versionString()},
		kong.Writers(stdout, stderr),
		kong.Exit(func(code int) { panic(exitRequest{code}) }),
		kong.ConfigureHelp(kong.HelpOptions{Compact: true, NoExpandSubcommands: true}),
	)
}

// watchSignals turns SIGTERM and SIGINT into stop (closed by the first), SIGUSR1 into
// report and SIGHUP into reload (one of each waiting at most).
func watchSignals() signals {
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGUSR1)
	stop, report, reload := make(chan struct{}), make(chan struct{}, 1), make(chan struct{}, 1)
	go func() {
		for sig := range sigs {
			switch sig {
			case syscall.SIGHUP:
				select {
				case reload <- struct{}{}:
				default:
				}
			case syscall.SIGUSR1:
				select {
				case report <- struct{}{}:
				default:
				}
			default:
				close(stop)
				return
			}
		}
	}()
	return signals{stop: stop, report: report, reload: reload}
}

// runTunnel sets up the interface and the carrier, runs the link until sig.stop is
// closed, and takes everything down again. Its status is served under runDir. On
// sig.reload, reparse reads the options again.
func runTunnel(cfg *config, stderr io.Writer, sig signals, runDir string, reparse func() (*config, error)) error {
	var logTo io.Writer = stderr
	if cfg.syslog {
		w, err := newSyslogWriter("", "")
		if err != nil {
			return err
		}
		logTo = w
	}
	log := newLogger(logTo, "ciped", cfg.debug)
	var dev tun.Device
	var err error
	if cfg.tunOffload {
		dev, err = tun.CreateTUN(cfg.device, cfg.mtu)
	} else {
		dev, err = openPlainTUN(cfg.device, cfg.mtu)
	}
	if err != nil {
		if errors.Is(err, os.ErrPermission) {
			return fmt.Errorf("create interface %q: %w (ciped needs root, or CAP_NET_ADMIN)", cfg.device, err)
		}
		return fmt.Errorf("create interface %q: %w", cfg.device, err)
	}
	name, err := dev.Name()
	if err != nil {
		dev.Close()
		return fmt.Errorf("interface name: %w", err)
	}
	log.setPrefix(name)
	var port tunPort = &plainPort{dev: dev, mtu: cfg.mtu}
	if cfg.tunOffload {
		if port, err = newVnetPort(dev.File(), true); err != nil {
			dev.Close()
			return fmt.Errorf("interface %s: %w", name, err)
		}
	}
	index, err := ifIndex(name)
	if err == nil {
		// Up first: an IPv6 peer route added to a down link is lost when it comes up.
		err = setLinkUp(index)
	}
	if err == nil {
		err = addAddress(index, cfg.ipaddr, cfg.ptpaddr, cfg.metric)
	}
	if err != nil {
		dev.Close()
		return fmt.Errorf("configure %s: %w", name, err)
	}
	conn, notes, err := listenCarrier(cfg.me, carrierOptions{batch: carrierBatch, gso: cfg.udpGSO, gro: cfg.udpGRO})
	if err != nil {
		dev.Close()
		return fmt.Errorf("carrier socket on %s: %w", cfg.me, err)
	}
	for _, note := range notes {
		log.Printf("%s", note)
	}
	var link carrier = conn
	if cfg.socks.IsValid() {
		sc, err := newSocksCarrier(conn, cfg.socks, cfg.peer.Addr(), carrierBatch, log)
		if err != nil {
			conn.Close()
			dev.Close()
			return err
		}
		link = sc
	}
	if cfg.cttl > 0 {
		if err := conn.setTTL(cfg.cttl); err != nil {
			conn.Close()
			dev.Close()
			return fmt.Errorf("set carrier TTL: %w", err)
		}
	}
	ptp := "learned from the peer"
	if cfg.ptpaddr.IsValid() {
		ptp = cfg.ptpaddr.String()
	}
	peer := cfg.peer.String()
	if cfg.dynamicPeer() {
		peer = "whoever authenticates first"
	}
	log.Printf("%s, mtu %d, tunnel %s peer %s, carrier %s to %s", versionString(), cfg.mtu, cfg.ipaddr, ptp,
		conn.LocalAddr(), peer)

	l := newLink(cfg, log, dev, port, link, name, index)
	if cfg.rpfilter {
		if err := l.filterSources(); err != nil {
			link.Close()
			dev.Close()
			return fmt.Errorf("rpfilter: %w", err)
		}
	}
	status, err := listenStatus(runDir, name, l.report)
	if err != nil {
		link.Close()
		dev.Close()
		return fmt.Errorf("status socket: %w", err)
	}
	l.onLinkChange = func(s string) { notify(log, "STATUS="+s) }
	l.start()
	notify(log, "READY=1\nSTATUS=interface "+name+" configured, waiting for the peer")
	var failure error
	for failure == nil {
		select {
		case <-sig.stop:
		case <-sig.report:
			l.logStatus()
			continue
		case <-sig.reload:
			applyReload(l, log, reparse)
			continue
		case failure = <-l.failed:
			log.Printf("%v: shutting down", failure)
		}
		break
	}
	notify(log, "STOPPING=1")
	l.close()
	status.close()
	log.Printf("stopped: %s", l.stats.summary())
	return failure
}

// applyReload reads the options again and applies what may change on the running link,
// telling systemd (RELOADING=1, then READY=1). A file that fails its checks, or a change
// that cannot be made live, changes nothing and is logged with the reason.
func applyReload(l *linkLife, log *logger, reparse func() (*config, error)) {
	var now unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &now)
	notify(log, fmt.Sprintf("RELOADING=1\nMONOTONIC_USEC=%d", now.Nano()/1000))
	defer notify(log, "READY=1")
	started := time.Now()
	next, err := reparse()
	if err != nil {
		log.Printf("reload: %v; nothing was changed", err)
		var ue *usageError
		if errors.As(err, &ue) && ue.hint != "" {
			log.Printf("reload: hint: %s", ue.hint)
		}
		return
	}
	changed, err := l.reload(next)
	switch {
	case err != nil:
		log.Printf("reload refused: %v", err)
	case len(changed) == 0:
		log.Printf("reloaded in %v: nothing changed", time.Since(started).Round(time.Microsecond))
	default:
		log.Printf("reloaded in %v: %s changed", time.Since(started).Round(time.Microsecond), strings.Join(changed, ", "))
	}
}

// notify tells systemd a state, logging (not failing) when that does not work.
func notify(log *logger, state string) {
	if err := sdNotify(state); err != nil {
		log.Printf("cannot notify systemd: %v", err)
	}
}

// runStatus is `ciped status [DEVICE] [--json|--metrics]`: the links found, and an exit
// status that says whether they are up (see the status* constants).
func runStatus(stdout, stderr io.Writer, dir, device string, asJSON, metrics bool) int {
	if _, err := os.ReadDir(dir); errors.Is(err, os.ErrPermission) {
		fmt.Fprintf(stderr, "ciped: error: %s is not readable: ciped status needs root\n", dir)
		return statusNoAccess
	}
	reports, err := readStatus(dir, device)
	if err != nil {
		fmt.Fprintf(stderr, "ciped: error: %v\n", err)
		return statusNotRunning
	}
	switch {
	case metrics:
		writeMetrics(stdout, reports)
	case asJSON:
		if reports == nil {
			reports = []statusReport{}
		}
		b, _ := json.MarshalIndent(reports, "", "  ")
		fmt.Fprintln(stdout, string(b))
	default:
		here := netnsID()
		for i, r := range reports {
			if i > 0 {
				fmt.Fprintln(stdout)
			}
			formatStatus(stdout, r, here)
		}
	}
	if len(reports) == 0 && !metrics {
		what := "no ciped is running"
		if device != "" {
			what = fmt.Sprintf("no ciped is running on %q", device)
		}
		fmt.Fprintf(stderr, "ciped: %s\n", what)
	}
	return statusExit(reports)
}

// Compile-time check that the real socket is a carrier.
var _ carrier = (*udpCarrier)(nil)
