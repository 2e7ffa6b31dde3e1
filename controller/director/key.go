package director

import (
	"crypto/ed25519"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/edgefleet/edgefleet/proto/trust"
)

// Key file names under the controller's DATA/keys directory.
const (
	KeysDir        = "keys"
	PrivateKeyFile = "director.key"
	PublicKeyFile  = "director.pub"
	privateKeyMode = 0o600
	publicKeyMode  = 0o644
	keysDirMode    = 0o700
)

// LoadOrCreateKey returns the director key kept in dataDir/keys, making it
// on first start: director.key (0600, never leaves the controller) and
// director.pub, which every agent is given as --director-key. created
// reports a new key. A missing director.pub is written again from the
// private key, so an operator can always copy it to devices.
func LoadOrCreateKey(dataDir string) (priv ed25519.PrivateKey, created bool, err error) {
	dir := filepath.Join(dataDir, KeysDir)
	privPath, pubPath := filepath.Join(dir, PrivateKeyFile), filepath.Join(dir, PublicKeyFile)
	if err := recoverRotation(dir); err != nil {
		return nil, false, err
	}
	priv, err = trust.ReadPrivateKey(privPath)
	switch {
	case err == nil:
	case errors.Is(err, os.ErrNotExist):
		if err := os.MkdirAll(dir, keysDirMode); err != nil {
			return nil, false, fmt.Errorf("director key: %w", err)
		}
		if _, priv, err = trust.GenerateKey(); err != nil {
			return nil, false, fmt.Errorf("director key: %w", err)
		}
		pem, err := trust.MarshalPrivateKey(priv)
		if err != nil {
			return nil, false, fmt.Errorf("director key: %w", err)
		}
		// O_EXCL: two controllers racing on one data directory must not
		// each believe in a different key.
		f, err := os.OpenFile(privPath, os.O_WRONLY|os.O_CREATE|os.O_EXCL, privateKeyMode)
		if err != nil {
			return nil, false, fmt.Errorf("director key %s: %w", privPath, err)
		}
		_, err = f.Write(pem)
		if err == nil {
			err = f.Sync()
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			os.Remove(privPath)
			return nil, false, fmt.Errorf("director key %s: %w", privPath, err)
		}
		created = true
	default:
		return nil, false, fmt.Errorf("director key: %w; restore %s from a backup (agents trust only its public half), or move it away to make a new key and give every agent the new %s", err, privPath, PublicKeyFile)
	}
	pub := priv.Public().(ed25519.PublicKey)
	if existing, err := trust.ReadPublicKey(pubPath); err == nil && existing.Equal(pub) {
		return priv, created, nil
	}
	pem, err := trust.MarshalPublicKey(pub)
	if err != nil {
		return nil, false, fmt.Errorf("director key: %w", err)
	}
	tmp := pubPath + ".tmp"
	if err := os.WriteFile(tmp, pem, publicKeyMode); err != nil {
		return nil, false, fmt.Errorf("director public key %s: %w", pubPath, err)
	}
	if err := os.Rename(tmp, pubPath); err != nil {
		os.Remove(tmp)
		return nil, false, fmt.Errorf("director public key %s: %w", pubPath, err)
	}
	return priv, created, nil
}
