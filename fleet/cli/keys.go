package cli

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/proto/trust"
)

// Key file names written by `fleet keys init`.
const (
	releaseKeyFile = "release.key"
	releasePubFile = "release.pub"
)

// keysUsage lists the keys subcommands.
const keysUsage = "init [--dir DIR] | list | rotate-director [--overlap D] | rotate-release --old-key F --new-key F [--sequence N] [--overlap D] [--out FILE] | push FILE"

func runKeys(ctx context.Context, e *exec, args []string) error {
	if len(args) == 0 {
		return usageErr("want: fleet keys " + keysUsage)
	}
	switch args[0] {
	case "init":
		return runKeysInit(e, args)
	case "list":
		return runKeysList(ctx, e, args[1:])
	case "rotate-director":
		return runRotateDirector(ctx, e, args[1:])
	case "rotate-release":
		return runRotateRelease(ctx, e, args[1:])
	case "push":
		return runKeysPush(ctx, e, args[1:])
	}
	return usageErr("unknown keys subcommand %q; want fleet keys %s", args[0], keysUsage)
}

func runKeysInit(e *exec, args []string) error {
	var g globals
	fs := newFlags(e, "keys init", &g)
	dir := fs.String("dir", "keys", "directory for release.key (keep it offline) and release.pub (give it to agents)")
	if _, err := parse(fs, args[1:]); err != nil {
		return err
	}
	keyPath, pubPath := filepath.Join(*dir, releaseKeyFile), filepath.Join(*dir, releasePubFile)
	for _, p := range []string{keyPath, pubPath} {
		if _, err := os.Stat(p); err == nil {
			return fmt.Errorf("%s exists; refusing to overwrite a key (move it away to make a new one)", p)
		}
	}
	pub, priv, err := trust.GenerateKey()
	if err != nil {
		return err
	}
	kb, err := trust.MarshalPrivateKey(priv)
	if err != nil {
		return err
	}
	pb, err := trust.MarshalPublicKey(pub)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(*dir, 0o700); err != nil {
		return err
	}
	if err := writeExclusive(keyPath, kb, 0o600); err != nil {
		return err
	}
	if err := writeExclusive(pubPath, pb, 0o644); err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "release key %s\n  private: %s (sign bundles with it; keep it offline)\n  public:  %s (give it to agents and the controller)\n",
		trust.KeyID(pub), keyPath, pubPath)
	return nil
}

func writeExclusive(path string, data []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// runModelSign adds a release-key signature over a bundle's manifest. A
// signature by the same key replaces the old one; others are kept, so a
// bundle can carry the old and the new key's signatures during rotation.
func runModelSign(e *exec, args []string) error {
	var g globals
	fs := newFlags(e, "model sign", &g)
	key := fs.String("key", filepath.Join("keys", releaseKeyFile), "release private key file")
	out := fs.String("out", "", "signed bundle to write (default: replace BUNDLE)")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usageErr("want one BUNDLE file")
	}
	b, err := bundle.ReadFile(pos[0])
	if err != nil {
		return err
	}
	priv, err := trust.ReadPrivateKey(*key)
	if err != nil {
		return err
	}
	var sigs []trust.Signature
	if len(b.Signature) > 0 {
		if sigs, err = trust.DecodeSignatures(b.Signature); err != nil {
			return fmt.Errorf("bundle %s: existing %s: %w", pos[0], bundle.SignatureName, err)
		}
	}
	s := trust.Sign(priv, trust.DomainBundleManifest, b.ManifestJSON)
	kept := sigs[:0]
	for _, old := range sigs {
		if old.KeyID != s.KeyID {
			kept = append(kept, old)
		}
	}
	if len(kept) >= trust.MaxSignatures {
		return errors.New("bundle already carries the most signatures allowed; drop old keys' signatures first")
	}
	if b.Signature, err = trust.EncodeSignatures(append(kept, s)); err != nil {
		return err
	}
	data, err := b.Encode()
	if err != nil {
		return err
	}
	dst := *out
	if dst == "" {
		dst = pos[0]
	}
	tmp := dst + ".tmp"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return err
	}
	if err := os.Rename(tmp, dst); err != nil {
		return err
	}
	signed, err := bundle.Decode(data)
	if err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "signed %s@%s with key %s: %s sha256:%s\n", b.Manifest.Name, b.Manifest.Version, s.KeyID, dst, signed.Digest)
	return nil
}
