package memtrim

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"reflect"
	"strconv"
	"strings"
	"syscall"
)

// maxMaps caps what is read of /proc/self/maps: an agent has a few dozen
// mappings, a few KiB.
const maxMaps = 1 << 20

// releaseBinary unmaps the read-only mappings of the file this code runs
// from. It finds them by the device and inode of the mapping that holds
// this very function, not by path: after a self-update the running binary
// has been renamed.
func releaseBinary() (int64, error) {
	f, err := os.Open("/proc/self/maps")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxMaps+1))
	if err != nil {
		return 0, err
	}
	if len(data) > maxMaps {
		return 0, fmt.Errorf("/proc/self/maps is over %d bytes", maxMaps)
	}
	maps, err := parseMaps(data)
	if err != nil {
		return 0, err
	}
	self := uint64(reflect.ValueOf(releaseBinary).Pointer())
	var file *mapping
	for i := range maps {
		if maps[i].lo <= self && self < maps[i].hi {
			file = &maps[i]
			break
		}
	}
	if file == nil || file.inode == 0 {
		return 0, fmt.Errorf("no file mapping holds this program's code (%#x)", self)
	}
	var unmapped int64
	for _, m := range maps {
		if m.dev != file.dev || m.inode != file.inode || !m.private || m.writable {
			continue
		}
		if _, _, errno := syscall.Syscall(syscall.SYS_MADVISE, uintptr(m.lo), uintptr(m.hi-m.lo), syscall.MADV_DONTNEED); errno != 0 {
			return unmapped, fmt.Errorf("madvise %#x-%#x: %w", m.lo, m.hi, errno)
		}
		unmapped += int64(m.hi - m.lo)
	}
	return unmapped, nil
}

// mapping is one line of /proc/PID/maps.
type mapping struct {
	lo, hi            uint64
	writable, private bool
	dev               string
	inode             uint64
}

// parseMaps parses /proc/PID/maps lines: "lo-hi perms offset dev inode
// [path]".
func parseMaps(data []byte) ([]mapping, error) {
	var out []mapping
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 5 {
			continue
		}
		lo, hi, ok := strings.Cut(f[0], "-")
		if !ok || len(f[1]) != 4 {
			return nil, fmt.Errorf("/proc/self/maps line %q: not lo-hi perms", sc.Text())
		}
		var m mapping
		var err1, err2, err3 error
		m.lo, err1 = strconv.ParseUint(lo, 16, 64)
		m.hi, err2 = strconv.ParseUint(hi, 16, 64)
		m.inode, err3 = strconv.ParseUint(f[4], 10, 64)
		if err1 != nil || err2 != nil || err3 != nil || m.hi < m.lo {
			return nil, fmt.Errorf("/proc/self/maps line %q: bad address or inode", sc.Text())
		}
		m.writable, m.private, m.dev = f[1][1] == 'w', f[1][3] == 'p', f[3]
		out = append(out, m)
	}
	return out, sc.Err()
}
