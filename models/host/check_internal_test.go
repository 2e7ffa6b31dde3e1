package host

import (
	"archive/tar"
	"bytes"
	"testing"

	"github.com/edgefleet/edgefleet/models/bundle"
)

// FuzzReadLenient: whatever the bytes, the lenient reader of CheckFile
// neither panics nor returns members over their caps.
func FuzzReadLenient(f *testing.F) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, m := range []struct{ name, data string }{
		{bundle.ManifestName, `{"abi":1,"name":"x","version":"1.0.0"}`},
		{bundle.ModuleName, "\x00asm\x01\x00\x00\x00"},
	} {
		_ = tw.WriteHeader(&tar.Header{Name: m.name, Mode: 0o644, Size: int64(len(m.data))})
		_, _ = tw.Write([]byte(m.data))
	}
	_ = tw.Close()
	f.Add(buf.Bytes())
	f.Add([]byte("not a tar"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		b, err := readLenient(data)
		if err != nil {
			return
		}
		if len(b.ManifestJSON) > bundle.MaxManifestSize || len(b.Module) > bundle.MaxBundleSize || b.Digest == "" {
			t.Fatalf("manifest %d bytes, module %d bytes, digest %q", len(b.ManifestJSON), len(b.Module), b.Digest)
		}
	})
}
