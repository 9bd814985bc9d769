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
	"syscall"

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

// signals are what run reacts to while a link runs: stop (SIGTERM, SIGINT) and report
// (SIGUSR1, status to the log).
type signals struct {
	stop   <-chan struct{}
	report <-chan struct{}
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
	c := &cli{systemOptions: systemOptions, origins: map[string]string{}}
	fail := func(code int, err error) int {
		fmt.Fprintf(stderr, "ciped: error: %v\n", err)
		var ue *usageError
		if errors.As(err, &ue) && ue.hint != "" {
			fmt.Fprintf(stderr, "ciped: hint: %s\n", ue.hint)
		}
		return code
	}
	parser, err := newParser(c, stdout, stderr)
	if err != nil {
		return fail(exitFailure, err)
	}
	kargs, origins, err := rewriteArgs(args, optionNames(parser.Model))
	if err != nil {
		return fail(exitUsage, err)
	}
	c.origins = origins
	ctx, err := func() (ctx *kong.Context, err error) {
		defer func() {
			if r := recover(); r != nil {
				req, ok := r.(exitRequest)
				if !ok {
					panic(r)
				}
				code = req.code
				err = errExitRequested
			}
		}()
		return parser.Parse(kargs)
	}()
	if errors.Is(err, errExitRequested) {
		return code
	}
	if err != nil {
		return fail(exitUsage, err)
	}
	switch ctx.Command() {
	case "status <device>", "status":
		return runStatus(stdout, stderr, runDir, c.Status.Device, c.Status.JSON)
	case "genkey":
		var k [linkKeySize]byte
		if _, err := rand.Read(k[:]); err != nil {
			return fail(exitFailure, err)
		}
		fmt.Fprintf(stdout, "key %s\n", hex.EncodeToString(k[:]))
		return exitOK
	default:
		cfg, err := c.config()
		if err != nil {
			return fail(exitUsage, err)
		}
		sig := signals{stop: stop}
		if stop == nil {
			sig = watchSignals(stderr)
		}
		if err := runTunnel(cfg, stderr, sig, runDir); err != nil {
			return fail(exitFailure, err)
		}
		return exitOK
	}
}

var errExitRequested = errors.New("exit requested")

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

// watchSignals turns SIGTERM and SIGINT into stop (closed by the first) and SIGUSR1 into
// report; it ignores SIGHUP, saying so.
func watchSignals(stderr io.Writer) signals {
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGUSR1)
	stop, report := make(chan struct{}), make(chan struct{}, 1)
	go func() {
		for sig := range sigs {
			switch sig {
			case syscall.SIGHUP:
				fmt.Fprintln(stderr, "ciped: SIGHUP ignored; restart ciped to change its options")
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
	return signals{stop: stop, report: report}
}

// runTunnel sets up the interface and the carrier, runs the link until sig.stop is
// closed, and takes everything down again. Its status is served under runDir.
func runTunnel(cfg *config, stderr io.Writer, sig signals, runDir string) error {
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

// notify tells systemd a state, logging (not failing) when that does not work.
func notify(log *logger, state string) {
	if err := sdNotify(state); err != nil {
		log.Printf("cannot notify systemd: %v", err)
	}
}

// runStatus is `ciped status [DEVICE] [--json]`: 0 if a link answered, 1 if none did.
func runStatus(stdout, stderr io.Writer, dir, device string, asJSON bool) int {
	reports, err := readStatus(dir, device)
	if err != nil {
		fmt.Fprintf(stderr, "ciped: error: %v\n", err)
		return exitFailure
	}
	if asJSON {
		if reports == nil {
			reports = []statusReport{}
		}
		b, _ := json.MarshalIndent(reports, "", "  ")
		fmt.Fprintln(stdout, string(b))
	} else {
		here := netnsID()
		for i, r := range reports {
			if i > 0 {
				fmt.Fprintln(stdout)
			}
			formatStatus(stdout, r, here)
		}
	}
	if len(reports) == 0 {
		what := "no ciped is running"
		if device != "" {
			what = fmt.Sprintf("no ciped is running on %q", device)
		}
		if _, err := os.Stat(dir); errors.Is(err, os.ErrPermission) {
			what += " (or " + dir + " is not readable: ciped status needs root)"
		}
		fmt.Fprintf(stderr, "ciped: %s\n", what)
		return exitFailure
	}
	return exitOK
}

// Compile-time check that the real socket is a carrier.
var _ carrier = (*udpCarrier)(nil)
