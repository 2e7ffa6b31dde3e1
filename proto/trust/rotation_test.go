package trust

import (
	"errors"
	"strings"
	"testing"
	"time"

	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"google.golang.org/protobuf/proto"
)

func TestAnnouncementSignVerify(t *testing.T) {
	oldPub, oldPriv, _ := GenerateKey()
	newPub, newPriv, _ := GenerateKey()
	now := time.UnixMilli(1_800_000_000_000)
	a := NewAnnouncement(pb.KeyRole_KEY_ROLE_DIRECTOR, newPub, 1, now, now.Add(time.Hour))
	s, err := SignAnnouncement(oldPriv, a)
	if err != nil {
		t.Fatal(err)
	}
	got, err := VerifyAnnouncement(NewKeySet(oldPub), s)
	if err != nil {
		t.Fatalf("good announcement refused: %v", err)
	}
	if !PublicKey(got).Equal(newPub) || got.GetSequence() != 1 || got.GetRetirePreviousAtUnixMs() != now.Add(time.Hour).UnixMilli() {
		t.Fatalf("decoded %v", got)
	}

	selfSigned, _ := SignAnnouncement(newPriv, a)
	tampered := proto.Clone(s).(*pb.SignedKeyAnnouncement)
	tampered.Announcement = append([]byte(nil), s.Announcement...)
	tampered.Announcement[len(tampered.Announcement)-1] ^= 1
	otherDomain := proto.Clone(s).(*pb.SignedKeyAnnouncement)
	sig := Sign(oldPriv, DomainDesiredState, s.Announcement)
	otherDomain.Signature = sig.Sig
	cases := []struct {
		name string
		ks   *KeySet
		s    *pb.SignedKeyAnnouncement
		want error
		msg  string
	}{
		{"signed by the new key itself", NewKeySet(oldPub), selfSigned, ErrUnknownKey, ""},
		{"tampered", NewKeySet(oldPub), tampered, nil, ""},
		{"signed for desired states", NewKeySet(oldPub), otherDomain, ErrBadSig, ""},
		{"no trusted key", nil, s, nil, "no director key is trusted"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := VerifyAnnouncement(c.ks, c.s)
			if err == nil {
				t.Fatal("accepted")
			}
			if c.want != nil && !errors.Is(err, c.want) {
				t.Fatalf("err = %v, want %v", err, c.want)
			}
			if c.msg != "" && !strings.Contains(err.Error(), c.msg) {
				t.Fatalf("err = %v, want it to say %q", err, c.msg)
			}
		})
	}
}

func TestAnnouncementForm(t *testing.T) {
	pub, priv, _ := GenerateKey()
	good := NewAnnouncement(pb.KeyRole_KEY_ROLE_RELEASE, pub, 3, time.Now(), time.Time{})
	mutate := func(f func(a *pb.KeyAnnouncement)) *pb.KeyAnnouncement {
		a := proto.Clone(good).(*pb.KeyAnnouncement)
		f(a)
		return a
	}
	cases := []struct {
		name string
		a    *pb.KeyAnnouncement
		want string
	}{
		{"no role", mutate(func(a *pb.KeyAnnouncement) { a.Role = 0 }), "unknown role"},
		{"short key", mutate(func(a *pb.KeyAnnouncement) { a.PublicKey = a.PublicKey[:31] }), "32"},
		{"wrong key id", mutate(func(a *pb.KeyAnnouncement) { a.KeyId = "0000000000000000" }), "does not match"},
		{"sequence 0", mutate(func(a *pb.KeyAnnouncement) { a.Sequence = 0 }), "sequence 0"},
		{"negative retirement", mutate(func(a *pb.KeyAnnouncement) { a.RetirePreviousAtUnixMs = -1 }), "negative"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if _, err := SignAnnouncement(priv, c.a); err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("err = %v, want it to contain %q", err, c.want)
			}
		})
	}
	s, err := SignAnnouncement(priv, good)
	if err != nil {
		t.Fatal(err)
	}
	chain := &pb.KeyAnnouncements{}
	for range MaxAnnouncements + 1 {
		chain.Announcements = append(chain.Announcements, s)
	}
	b, _ := proto.Marshal(chain)
	if _, err := DecodeAnnouncements(b); err == nil {
		t.Fatal("a chain over MaxAnnouncements was accepted")
	}
	b, _ = proto.Marshal(&pb.KeyAnnouncements{Announcements: chain.Announcements[:2]})
	if got, err := DecodeAnnouncements(b); err != nil || len(got.GetAnnouncements()) != 2 {
		t.Fatalf("DecodeAnnouncements = %v, %v", got, err)
	}
	if _, err := DecodeAnnouncements(make([]byte, MaxAnnouncementsDoc+1)); err == nil {
		t.Fatal("an oversized document was decoded")
	}
}

func FuzzDecodeAnnouncements(f *testing.F) {
	pub, priv, _ := GenerateKey()
	s, _ := SignAnnouncement(priv, NewAnnouncement(pb.KeyRole_KEY_ROLE_DIRECTOR, pub, 1, time.UnixMilli(1), time.UnixMilli(2)))
	b, _ := proto.Marshal(&pb.KeyAnnouncements{Announcements: []*pb.SignedKeyAnnouncement{s, s}})
	f.Add(b)
	one, _ := proto.Marshal(s)
	f.Add(one)
	f.Add([]byte{})
	ks := NewKeySet(pub)
	f.Fuzz(func(t *testing.T, b []byte) {
		ka, err := DecodeAnnouncements(b)
		if err != nil {
			return
		}
		if len(ka.GetAnnouncements()) > MaxAnnouncements {
			t.Fatalf("%d announcements accepted", len(ka.GetAnnouncements()))
		}
		for _, s := range ka.GetAnnouncements() {
			a, err := VerifyAnnouncement(ks, s)
			if err == nil && len(a.GetPublicKey()) != 32 {
				t.Fatalf("verified an announcement with a %d-byte key", len(a.GetPublicKey()))
			}
		}
	})
}
