package memtrim

import (
	"os"
	"strconv"
	"strings"
	"testing"
)

// rssFile reads this process's file-backed resident memory (RssFile) in
// bytes.
func rssFile(t *testing.T) int64 {
	t.Helper()
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "RssFile:"); ok {
			n, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				t.Fatalf("RssFile line %q: %v", line, err)
			}
			return n << 10
		}
	}
	t.Fatal("no RssFile in /proc/self/status")
	return 0
}

// Release really unmaps this binary's pages (the test binary's), and the
// process goes on running code from them.
func TestReleaseUnmapsTheBinary(t *testing.T) {
	before := rssFile(t)
	unmapped, err := Release()
	if err != nil {
		t.Fatal(err)
	}
	after := rssFile(t)
	exe, err := os.Stat("/proc/self/exe")
	if err != nil {
		t.Fatal(err)
	}
	if unmapped <= 0 || unmapped > exe.Size()+1<<20 {
		t.Fatalf("unmapped %d bytes of a %d-byte binary", unmapped, exe.Size())
	}
	// What stays is what ran between the two reads, and other files'
	// pages; the binary's start-up pages must be gone.
	if after >= before {
		t.Fatalf("RssFile %d KiB before Release, %d KiB after: nothing was unmapped", before>>10, after>>10)
	}
	t.Logf("RssFile %d KiB -> %d KiB; %d KiB of mappings advised", before>>10, after>>10, unmapped>>10)
}

func TestParseMaps(t *testing.T) {
	in := "00400000-00c58000 r-xp 00000000 fe:00 10797840                           /usr/bin/fleet-agent\n" +
		"0147c000-01500000 rw-p 0107c000 fe:00 10797840                           /usr/bin/fleet-agent\n" +
		"7f08a8012000-7f08a8014000 r-xp 00000000 00:00 0                          [vdso]\n" +
		"7f0861190000-7f0861350000 rw-p 00000000 00:00 0 \n"
	maps, err := parseMaps([]byte(in))
	if err != nil {
		t.Fatal(err)
	}
	want := []mapping{
		{lo: 0x400000, hi: 0xc58000, private: true, dev: "fe:00", inode: 10797840},
		{lo: 0x147c000, hi: 0x1500000, writable: true, private: true, dev: "fe:00", inode: 10797840},
		{lo: 0x7f08a8012000, hi: 0x7f08a8014000, private: true, dev: "00:00"},
		{lo: 0x7f0861190000, hi: 0x7f0861350000, writable: true, private: true, dev: "00:00"},
	}
	if len(maps) != len(want) {
		t.Fatalf("%d mappings, want %d: %+v", len(maps), len(want), maps)
	}
	for i := range want {
		if maps[i] != want[i] {
			t.Errorf("line %d: %+v, want %+v", i, maps[i], want[i])
		}
	}
	for _, bad := range []string{"zz-00 r-xp 0 fe:00 1 /x", "0-1 r 0 fe:00 1 /x", "10-1 r-xp 0 fe:00 1 /x", "0-1 r-xp 0 fe:00 inode /x"} {
		if _, err := parseMaps([]byte(bad)); err == nil {
			t.Errorf("parseMaps(%q) succeeded", bad)
		}
	}
}

func FuzzParseMaps(f *testing.F) {
	f.Add([]byte("00400000-00c58000 r-xp 00000000 fe:00 10797840 /usr/bin/fleet-agent\n"))
	f.Add([]byte("7f0861190000-7f0861350000 rw-p 00000000 00:00 0\n\n"))
	f.Add([]byte("ffffffffffffffff-0 ---s 0 0:0 18446744073709551615"))
	f.Fuzz(func(t *testing.T, data []byte) {
		maps, err := parseMaps(data)
		if err != nil {
			return
		}
		for _, m := range maps {
			if m.hi < m.lo {
				t.Fatalf("mapping %+v ends before it starts", m)
			}
		}
	})
}
