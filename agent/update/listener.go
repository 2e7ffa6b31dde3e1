package update

import (
	"fmt"
	"net"
	"os"
	"strconv"
)

// ListenFDEnv names the environment variable through which a re-executed
// agent inherits its local endpoint's listening socket, so connections
// that arrive during the restart wait in the socket's backlog instead of
// being refused.
const ListenFDEnv = "EDGEFLEET_LISTEN_FD"

// Listen returns the listener of the local endpoint: the socket inherited
// from the process this one replaced (ListenFDEnv), or a new one on addr.
// It also returns a duplicate of the socket kept for the next re-exec
// (nil when the listener is not TCP).
func Listen(addr string) (net.Listener, *os.File, error) {
	var ln net.Listener
	if v := os.Getenv(ListenFDEnv); v != "" {
		os.Unsetenv(ListenFDEnv) // not for the agent's own children
		fd, err := strconv.Atoi(v)
		if err == nil && fd > 2 {
			f := os.NewFile(uintptr(fd), "inherited-listener")
			ln, err = net.FileListener(f)
			f.Close()
		}
		if err != nil {
			ln = nil // fall back to a fresh socket
		}
	}
	if ln == nil {
		var err error
		if ln, err = net.Listen("tcp", addr); err != nil {
			return nil, nil, fmt.Errorf("listen on %s: %w; is another agent running? set --listen to a free address", addr, err)
		}
	}
	tl, ok := ln.(*net.TCPListener)
	if !ok {
		return ln, nil, nil
	}
	dup, err := tl.File()
	if err != nil {
		return ln, nil, nil
	}
	return ln, dup, nil
}

// PassListener makes the duplicate from Listen survive the next Exec and
// names it in the environment the new process gets.
func PassListener(dup *os.File) error {
	if dup == nil {
		return nil
	}
	fd := dup.Fd()
	if err := clearCloseOnExec(fd); err != nil {
		return err
	}
	return os.Setenv(ListenFDEnv, strconv.FormatUint(uint64(fd), 10))
}
